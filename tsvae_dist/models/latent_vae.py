"""`Stage2VAE`: a VAE on the stage-1 latents z, with a scalar γ_z (learned or optimal: models/gamma.py).

Encoder and decoder are each `depth` dense ReLU layers of `hidden` units; the network's input is
concatenated to the last hidden layer before the output heads (μ_u, log σ_u; ẑ), as the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gamma import init_gamma, loss_log_gamma
from .layers import fp32, init_glorot
from .losses import gaussian_nll, kl_standard_normal


class DenseSkip(nn.Module):
    """`depth` dense ReLU layers; returns [input, last hidden] concatenated ([N, in_dim + hidden])."""

    def __init__(self, in_dim: int, hidden: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(
            init_glorot(nn.Linear(in_dim if i == 0 else hidden, hidden)) for i in range(depth)
        )
        self.out_dim = in_dim + hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = F.relu(layer(h))
        return torch.cat([x, h.to(x.dtype)], dim=-1)


class Stage2Encoder(nn.Module):
    def __init__(self, latent_dim: int, hidden: int, depth: int):
        super().__init__()
        self.body = DenseSkip(latent_dim, hidden, depth)
        self.mu = init_glorot(nn.Linear(self.body.out_dim, latent_dim))
        self.log_sigma = init_glorot(nn.Linear(self.body.out_dim, latent_dim))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(z)
        return fp32(self.mu, h), fp32(self.log_sigma, h)  # the heads in fp32 (layers.fp32)


class Stage2Decoder(nn.Module):
    def __init__(self, latent_dim: int, hidden: int, depth: int):
        super().__init__()
        self.body = DenseSkip(latent_dim, hidden, depth)
        self.z_hat = init_glorot(nn.Linear(self.body.out_dim, latent_dim))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return fp32(self.z_hat, self.body(u))


class Stage2VAE(nn.Module):
    def __init__(self, latent_dim: int, hidden: int = 1024, depth: int = 3, gamma: str = "learned"):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Stage2Encoder(latent_dim, hidden, depth)
        self.decoder = Stage2Decoder(latent_dim, hidden, depth)
        init_gamma(self, gamma)  # log γ_z; γ = 1 at the start

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [N, κ] → (μ_u, log σ_u), each [N, κ] float32."""
        return self.encoder(z)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """u [N, κ] → ẑ(u) [N, κ] float32."""
        return self.decoder(u)

    def sample(self, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = ẑ(u) + γ_z·eps, with u ~ N(0, I) and eps ~ N(0, I) both drawn by the caller."""
        return self.decode(u) + torch.exp(self.log_gamma.float()) * eps.float()

    def forward(self, z: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training pass with u = μ_u + σ_u·eps. Returns `loss` (with graph) and detached `kl`,
        `nll`, `mse` (per dimension), `gamma` (γ_z), with the same conventions as Stage1VAE."""
        mu, log_sigma = self.encode(z)
        u = mu + torch.exp(log_sigma) * eps.to(mu.dtype)
        z_hat = self.decode(u)
        # fp32 whatever the autocast: γ_z → 0 too, and the NLL grows as 1/γ_z² (see Stage1VAE).
        with torch.autocast(device_type=z.device.type, enabled=False):
            kl = kl_standard_normal(mu.float(), log_sigma.float())
            log_gamma, gamma_metrics = loss_log_gamma(self, z.float(), z_hat.float())
            nll = gaussian_nll(z.float(), z_hat.float(), log_gamma)
            return {
                "loss": (kl + nll).mean(),
                "kl": kl.mean().detach(),
                "nll": nll.mean().detach(),
                "mse": (z_hat.float() - z.float()).square().mean().detach(),
                **gamma_metrics,
            }
