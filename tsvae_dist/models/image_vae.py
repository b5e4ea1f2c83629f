"""`Stage1VAE`: q(z|x) = N(μ(x), diag σ(x)²), decoder mean x̂ = sigmoid(f₁(z)), scalar γ_x (learned or optimal)."""

from __future__ import annotations

import torch
from torch import nn

from .gamma import init_gamma, loss_log_gamma
from .losses import bernoulli_nll, gaussian_nll, kl_standard_normal


class Stage1VAE(nn.Module):
    """A stage-1 VAE around an encoder (x → (μ, log σ)) and a decoder (z → logits).

    `likelihood` "gaussian" learns `log_gamma` (γ_x, a standard deviation, initialised to γ = 1);
    "cross_entropy" uses a Bernoulli likelihood and has no γ parameter at all, so DDP sees no
    unused parameter; `hasattr(model, "log_gamma")` tells the modes apart. `gamma` "optimal" makes
    γ_x the batch's closed-form value instead, `log_gamma` a buffer tracking it (see models/gamma.py).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        latent_dim: int,
        channels: int,
        resolution: int,
        likelihood: str = "gaussian",
        gamma: str = "learned",
    ):
        super().__init__()
        if likelihood not in ("gaussian", "cross_entropy"):
            raise ValueError(f"likelihood must be 'gaussian' or 'cross_entropy'; got {likelihood!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.channels = channels
        self.resolution = resolution
        self.likelihood = likelihood
        if likelihood == "gaussian":
            init_gamma(self, gamma)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float NCHW in [0, 1] → (μ, log σ), each [N, κ] float32."""
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, κ] → pre-sigmoid decoder output [N, C, H, W], float32 (the head runs in fp32 under autocast)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, κ] → decoder mean x̂ = sigmoid(logits) in [0, 1], float32."""
        return torch.sigmoid(self.decode_logits(z).float())

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents (stage-1 sampling passes z ~ N(0, I); two-stage passes z from stage 2)."""
        return self.decode(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training pass with z = μ + σ·eps (eps from the caller, shape of μ).

        Returns scalars: `loss` (KL + NLL, per-sample sums averaged over the batch; carries the
        graph), and detached metrics `kl`, `nll`, `mse` (per pixel) and, in gaussian mode, `gamma` (the
        γ_x this batch's loss used) and, with optimal γ, `gamma_floored`.
        """
        mu, log_sigma = self.encode(x)
        z = mu + torch.exp(log_sigma) * eps.to(mu.dtype)
        logits = self.decode_logits(z)
        # The loss in fp32 whatever the autocast: γ → 0 in training, so the reconstruction term
        # (x − x̂)²/(2γ²) grows as 1/γ² and differences of nearly equal pixels need fp32's mantissa
        # (bf16 keeps 8 bits; fp16 would also overflow). γ is never clamped (optimal γ: only from
        # log 0, and the metric gamma_floored counts it; see models/gamma.py).
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, logits32 = x.float(), logits.float()
            x_hat = torch.sigmoid(logits32)
            kl = kl_standard_normal(mu.float(), log_sigma.float())
            gaussian = self.likelihood == "gaussian"
            if gaussian:
                log_gamma, gamma_metrics = loss_log_gamma(self, x32, x_hat)
                nll = gaussian_nll(x32, x_hat, log_gamma)
            else:
                nll = bernoulli_nll(x32, logits32)
            loss = (kl + nll).mean()
            out = {
                "loss": loss,
                "kl": kl.mean().detach(),
                "nll": nll.mean().detach(),
                "mse": (x_hat - x32).square().mean().detach(),
            }
            if gaussian:
                out.update(gamma_metrics)
        return out
