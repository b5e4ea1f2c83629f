"""The InfoGAN networks: the paper's neutral architecture (MNIST, Fashion, CIFAR-10, CelebA).

Encoder: conv64 4×4 s2 lReLU(0.2) → conv128 4×4 s2 BN lReLU → fc1024 BN lReLU → fc 2κ, spectral
norm on every encoder layer, σ = softplus(·) + 1e-6. Decoder: fc1024 BN ReLU → fc 128·(s/4)² BN
ReLU → deconv64 4×4 s2 BN ReLU → deconv C 4×4 s2 (logits; the sigmoid is the caller's).
The side goes s → s/2 → s/4 and back, so any s divisible by 4 works (28 → 14 → 7 is the paper's
MNIST net); the fc layers grow as (s/4)², so large sides get expensive (see `geometry`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import fp32, init_normal, scaled, spectral_norm


def _sn(layer: nn.Module) -> nn.Module:
    # Init first: spectral_norm reparametrises `weight`, keeping the raw tensor as `.original`.
    return spectral_norm(init_normal(layer))


# Layers followed by BatchNorm have no bias: BN removes it, so its exact gradient is zero and Adam
# would turn rounding noise in that gradient into a random walk of the bias (and of BN's running mean).


class InfoGANEncoder(nn.Module):
    def __init__(self, channels: int, resolution: int, latent_dim: int, width: float, bn_momentum: float):
        super().__init__()
        c1, c2, hidden = scaled(64, width), scaled(128, width), scaled(1024, width)
        side = resolution // 4
        self.latent_dim = latent_dim
        self.conv1 = _sn(nn.Conv2d(channels, c1, 4, 2, 1))
        self.conv2 = _sn(nn.Conv2d(c1, c2, 4, 2, 1, bias=False))
        self.bn2 = nn.BatchNorm2d(c2, momentum=bn_momentum)
        self.fc3 = _sn(nn.Linear(c2 * side * side, hidden, bias=False))
        self.bn3 = nn.BatchNorm1d(hidden, momentum=bn_momentum)
        self.fc4 = _sn(nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
        h = F.leaky_relu(self.bn3(self.fc3(h.flatten(1))), 0.2)
        # The posterior head in fp32: softplus(·) + 1e-6 would round the 1e-6 away in bf16.
        mu, pre_sigma = fp32(self.fc4, h).chunk(2, dim=1)
        return mu, torch.log(F.softplus(pre_sigma) + 1e-6)


class InfoGANDecoder(nn.Module):
    def __init__(self, channels: int, resolution: int, latent_dim: int, width: float, bn_momentum: float):
        super().__init__()
        c1, c2, hidden = scaled(64, width), scaled(128, width), scaled(1024, width)
        self.side = resolution // 4
        self.c2 = c2
        self.fc1 = init_normal(nn.Linear(latent_dim, hidden, bias=False))
        self.bn1 = nn.BatchNorm1d(hidden, momentum=bn_momentum)
        self.fc2 = init_normal(nn.Linear(hidden, c2 * self.side * self.side, bias=False))
        self.bn2 = nn.BatchNorm1d(c2 * self.side * self.side, momentum=bn_momentum)
        self.deconv3 = init_normal(nn.ConvTranspose2d(c2, c1, 4, 2, 1, bias=False))
        self.bn3 = nn.BatchNorm2d(c1, momentum=bn_momentum)
        self.deconv4 = init_normal(nn.ConvTranspose2d(c1, channels, 4, 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(z)))
        h = F.relu(self.bn2(self.fc2(h)))
        h = h.view(-1, self.c2, self.side, self.side)
        h = F.relu(self.bn3(self.deconv3(h)))
        return fp32(self.deconv4, h)  # the logits head in fp32 (layers.fp32)
