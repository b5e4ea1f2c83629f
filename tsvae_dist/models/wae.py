"""The WAE networks (the paper's Table 2, CelebA 64; from Tolstikhin et al.).

Encoder: conv 128/256/512/1024 5×5 (strides 1, 2, 2, 2) BN ReLU → fc μ, fc log σ (σ = exp).
Decoder: fc (s/8)²·1024 ReLU → deconv 512/256/128 5×5 s2 BN ReLU → deconv C 5×5 s1 (logits).
At 64 px that is the paper's 8×8×1024 bottleneck; any side divisible by 8 builds the same way.
The flattened (s/8)²·1024 features feed dense layers, so parameters grow as s²: at 128 px the three
dense layers hold ~50M weights, at 256 px ~200M, which is where `geometry` stops (use resnet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import fp32, init_glorot, scaled


def _conv(c_in: int, c_out: int, stride: int, bias: bool = True) -> nn.Conv2d:
    return init_glorot(nn.Conv2d(c_in, c_out, 5, stride, padding=2, bias=bias))


def _deconv(c_in: int, c_out: int, stride: int, bias: bool = True) -> nn.ConvTranspose2d:
    # padding 2 + output_padding (stride - 1) gives TF 'same': side × stride.
    return init_glorot(nn.ConvTranspose2d(c_in, c_out, 5, stride, padding=2, output_padding=stride - 1, bias=bias))


# Layers followed by BatchNorm have no bias: BN removes it, so its exact gradient is zero and Adam
# would turn rounding noise in that gradient into a random walk.


class WAEEncoder(nn.Module):
    def __init__(self, channels: int, resolution: int, latent_dim: int, width: float, bn_momentum: float):
        super().__init__()
        dims = [scaled(d, width) for d in (128, 256, 512, 1024)]
        layers: list[nn.Module] = []
        c_in = channels
        for dim, stride in zip(dims, (1, 2, 2, 2), strict=True):
            layers += [_conv(c_in, dim, stride, bias=False), nn.BatchNorm2d(dim, momentum=bn_momentum), nn.ReLU()]
            c_in = dim
        self.features = nn.Sequential(*layers)
        flat = dims[-1] * (resolution // 8) ** 2
        self.mu = init_glorot(nn.Linear(flat, latent_dim))
        self.log_sigma = init_glorot(nn.Linear(flat, latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)
        return fp32(self.mu, h), fp32(self.log_sigma, h)  # the heads in fp32 (layers.fp32)


class WAEDecoder(nn.Module):
    def __init__(self, channels: int, resolution: int, latent_dim: int, width: float, bn_momentum: float):
        super().__init__()
        c0, *dims = (scaled(d, width) for d in (1024, 512, 256, 128))
        self.c0, self.side = c0, resolution // 8
        self.fc = init_glorot(nn.Linear(latent_dim, c0 * self.side * self.side))
        layers: list[nn.Module] = []
        c_in = c0
        for dim in dims:
            layers += [_deconv(c_in, dim, 2, bias=False), nn.BatchNorm2d(dim, momentum=bn_momentum), nn.ReLU()]
            c_in = dim
        layers.append(_deconv(c_in, channels, 1))
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, self.c0, self.side, self.side)
        *body, head = self.features  # iterating keeps the keys features.<i>; the logits head in fp32
        for layer in body:
            h = layer(h)
        return fp32(head, h)
