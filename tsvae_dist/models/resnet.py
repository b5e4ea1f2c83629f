"""The ResNet networks (the original code's `Resnet`, used for its CelebA samples).

Encoder: conv k×k → `num_scales` scale blocks (pre-activation residual blocks: BN ReLU conv, with
a conv shortcut), a stride-2 conv doubling the channels between scales (capped at `max_dim`),
global average pool, a residual fc block of `fc_dim`, then dense μ and log σ (σ = exp).
Decoder: dense to s0×s0×dims[0], then (stride-2 deconv, scale block) per doubling up to the image
side, channels halving from the cap down to `base_dim` at full size, and a k×k conv to C (logits).
The original starts at 2×2 and needs a power of two; we start at s0 = the side with factors of 2
removed (kept ≥ 2), so 28 = 7·2² starts at 7×7 and powers of two are exactly the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import decoder_start
from .layers import conv_same, deconv_double, fp32, init_glorot


class ResBlock(nn.Module):
    """Pre-activation residual block: `depth` × (BN, ReLU, conv k×k), plus a k×k conv shortcut."""

    def __init__(self, c_in: int, c_out: int, depth: int, kernel: int, bn_momentum: float):
        super().__init__()
        self.norms = nn.ModuleList()
        self.convs = nn.ModuleList()
        for i in range(depth):
            c = c_in if i == 0 else c_out
            self.norms.append(nn.BatchNorm2d(c, momentum=bn_momentum))
            self.convs.append(conv_same(c, c_out, kernel))
        self.shortcut = conv_same(c_in, c_out, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for norm, conv in zip(self.norms, self.convs, strict=True):
            y = conv(F.relu(norm(y)))
        return y + self.shortcut(x)


class ResFCBlock(nn.Module):
    """Dense residual block: `depth` × (ReLU, dense), plus a dense shortcut (no BN, as the original)."""

    def __init__(self, d_in: int, d_out: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(
            init_glorot(nn.Linear(d_in if i == 0 else d_out, d_out)) for i in range(depth)
        )
        self.shortcut = init_glorot(nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(F.relu(y))
        return y + self.shortcut(x)


def _scale_block(
    c_in: int, c_out: int, blocks: int, depth: int, kernel: int, bn_momentum: float
) -> nn.Sequential:
    return nn.Sequential(
        *(ResBlock(c_in if i == 0 else c_out, c_out, depth, kernel, bn_momentum) for i in range(blocks))
    )


class ResNetEncoder(nn.Module):
    def __init__(
        self,
        channels: int,
        latent_dim: int,
        *,
        num_scales: int,
        base_dim: int,
        max_dim: int,
        fc_dim: int,
        blocks_per_scale: int,
        depth_per_block: int,
        kernel: int,
        bn_momentum: float,
    ):
        super().__init__()
        dim = base_dim
        layers: list[nn.Module] = [conv_same(channels, dim, kernel)]
        for i in range(num_scales):
            layers.append(_scale_block(dim, dim, blocks_per_scale, depth_per_block, kernel, bn_momentum))
            if i != num_scales - 1:
                next_dim = min(dim * 2, max_dim)
                layers.append(conv_same(dim, next_dim, kernel, stride=2))
                dim = next_dim
        self.features = nn.Sequential(*layers)
        self.fc = ResFCBlock(dim, fc_dim, depth_per_block)  # one fc block, as the original's call
        self.mu = init_glorot(nn.Linear(fc_dim, latent_dim))
        self.log_sigma = init_glorot(nn.Linear(fc_dim, latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.features(x).mean(dim=(2, 3)))
        return fp32(self.mu, h), fp32(self.log_sigma, h)  # the heads in fp32 (layers.fp32)


class ResNetDecoder(nn.Module):
    def __init__(
        self,
        channels: int,
        resolution: int,
        latent_dim: int,
        *,
        base_dim: int,
        max_dim: int,
        blocks_per_scale: int,
        depth_per_block: int,
        kernel: int,
        bn_momentum: float,
    ):
        super().__init__()
        self.start, doublings = decoder_start(resolution)
        dims = [base_dim]
        for _ in range(doublings):
            dims.append(min(dims[-1] * 2, max_dim))
        dims.reverse()  # widest at the start side, base_dim at full resolution
        self.c0 = dims[0]
        self.fc = init_glorot(nn.Linear(latent_dim, self.start * self.start * dims[0]))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(dims[:-1], dims[1:], strict=True):
            layers.append(deconv_double(c_in, c_out, kernel))
            layers.append(_scale_block(c_out, c_out, blocks_per_scale, depth_per_block, kernel, bn_momentum))
        layers.append(conv_same(dims[-1], channels, kernel))
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # No activation after the dense layer: as in the original, the first deconv takes it as is and
        # the nonlinearity comes with the next scale block's pre-activation BN/ReLU.
        h = self.fc(z).view(-1, self.c0, self.start, self.start)
        *body, head = self.features  # iterating keeps the keys features.<i>; the logits head in fp32
        for layer in body:
            h = layer(h)
        return fp32(head, h)
