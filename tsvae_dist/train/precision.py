"""Mixed precision behind one helper: the autocast context and the gradient scaler for a setting.

One code path for fp32, bf16 and fp16, on CPU and GPU. Only fp16 needs a GradScaler (its range
underflows small gradients); bf16 has fp32's range. The models compute the γ and KL terms in fp32
whatever this says (see models/losses.py).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The forward-pass context for `precision` ("fp32" is a no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (a disabled one passes calls through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def adam(params, lr: float, betas: tuple[float, float], eps: float, device: torch.device) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedAdam when importable on a GPU, else torch's Adam (fused on GPU)."""
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # optional; never a requirement

            return FusedAdam(params, lr=lr, betas=betas, eps=eps, adam_w_mode=False)
        except ImportError:
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
