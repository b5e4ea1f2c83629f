"""The VAE loss terms, per sample (summed over every non-batch dimension; callers average the batch).

Callers pass float32 tensors: with a learned γ the reconstruction term scales as 1/γ² and γ falls
towards 0 during training (the paper's point), so bf16/fp16 would lose the term's precision and
fp16 would overflow. The stage modules compute these inside an autocast-disabled region.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def kl_standard_normal(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 2 log σ − 1), one value per sample: [N]."""
    terms = mu.square() + torch.exp(2.0 * log_sigma) - 2.0 * log_sigma - 1.0
    return 0.5 * terms.flatten(1).sum(dim=1)


def gaussian_nll(x: torch.Tensor, x_hat: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """−log N(x; x̂, γ² I) = Σ [(x − x̂)²/(2γ²) + log γ + ½ log 2π], one value per sample: [N].

    `log_gamma` is a scalar (γ is a standard deviation shared by every dimension).
    """
    squared = (x - x_hat).square().flatten(1).sum(dim=1)
    dims = x[0].numel()
    return 0.5 * squared * torch.exp(-2.0 * log_gamma) + dims * (log_gamma + HALF_LOG_TWO_PI)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of x ∈ [0, 1] under Bernoulli(sigmoid(logits)), summed: [N].

    From logits, so no clamping of sigmoid outputs is needed (the original clamps x̂ at 1e-8).
    """
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)
