"""Sampling from a trained run: stage-1 (z ~ N(0, I)) and stage-2 (u ~ N(0, I) → z = f₂(u) + γ_z·ε).

Sample i's noise is keyed by (seed, purpose, i), so the set of samples is the same for any world
size, batch size or order of generation. Callers decode in fixed chunks of indices (evaluation
units, generate's chunks and shards) so that the images are also bit-identical: a different batch
composition only changes them by float rounding, as batched kernels pick their summation order by
shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tsvae_dist.runtime.noise import keyed_normal

MODES = ("stage1", "stage2")


@torch.no_grad()
def sample_images(mode: str, stage1: torch.nn.Module, stage2: torch.nn.Module | None, indices: Sequence[int],
                  latent_dim: int, seed: int, purpose: str, device: torch.device) -> torch.Tensor:
    """Images in [0, 1], [len(indices), C, H, W], for the given sample indices."""
    keys = [str(i) for i in indices]
    if mode == "stage1":
        z = keyed_normal(keys, latent_dim, seed, purpose, "stage1-z")
    elif mode == "stage2":
        assert stage2 is not None, "stage-2 sampling needs the stage-2 model"
        u = keyed_normal(keys, latent_dim, seed, purpose, "stage2-u").to(device)
        eps = keyed_normal(keys, latent_dim, seed, purpose, "stage2-eps").to(device)
        z = stage2.sample(u, eps)
    else:
        raise ValueError(f"mode: {mode!r} is not one of {MODES}")
    return stage1.sample(z.to(device)).float().clamp(0, 1).cpu()


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] → [N, H, W, C] uint8 (rounded, as an image file stores them)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> np.ndarray:
    """A tiled [H', W', C] uint8 image of up to rows x columns images with a white border."""
    pixels = to_uint8_hwc(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = pixels[i]
    return out


def png_bytes(image_hwc: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc).save(buf, format="PNG")
    return buf.getvalue()
