"""The decoder's shared scalar standard deviation γ (γ_x in stage 1, γ_z in stage 2), learned or optimal.

- `learned` (the paper): `log_gamma` is a trained parameter, initialised to 0 (γ = 1). With Adam a
  log γ whose gradient keeps its sign moves by about one learning rate per step, so reaching γ*
  from 1 takes ln(1/γ*)/lr steps: the optimiser, not the data, sets the pace (`gamma_lr` helps).
- `optimal` (σ-VAE, Rybkin et al. 2021): for one shared scalar variance the NLL
  Σ[(x − x̂)²/(2γ²) + log γ] is minimised over γ at γ*² = the mean squared error per dimension, so
  the loss uses the batch's γ*, detached. Detaching is exact, not an approximation: γ* is the
  minimiser, so ∂loss/∂γ = 0 there and the gradient of min_γ loss(x̂, γ) is that of loss(x̂, γ*)
  with γ* held fixed (the envelope theorem). Under DDP the squared errors are summed over ranks
  first, so γ* is the *global* batch's and training does not depend on the world size.

  The state dict keeps `log_gamma` (a buffer here) as the value everything else reads: the
  report's γ_x and γ_z, and stage-2 sampling z = ẑ(u) + γ_z·ε. It holds log √(EMA of the batch
  MSE), the EMA bias-corrected as Adam's moments are (`gamma_ema` = [Σ wᵢ·mseᵢ, Σ wᵢ]), with decay
  0.9 (about the last 10 steps): steadier than one batch's value (±5 % for γ_z from 64 samples ×
  16 dimensions) and lagging a falling γ* by ~1 % where γ* still falls 0.1 % a step (stage 1 at
  the end of the synthetic preset; decay 0.99 lagged it by 15 % there: 0.052 vs 0.045). The
  training loss never reads the EMA. Both buffers are in checkpoints, so a resume continues exactly.

  Floor: σ-VAE soft-clips log σ at −6 (γ ≥ 0.0025). We do not: it biases γ even above the floor
  (softplus(log γ + 6) − 6 − log γ = +0.05 at log γ = −3) and the paper's point is γ → 0. γ*² is
  only kept from log(0) by a hard floor GAMMA_MIN² = 1e-12, far below anything 8-bit images or a
  trained stage 2 reach; a batch that hits it is counted in the metric `gamma_floored`.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn

from tsvae_dist.models.config import GAMMA_MODES

EMA_DECAY = 0.9  # optimal mode: decay of the MSE average that `log_gamma` reports (≈ the last 10 steps)
GAMMA_MIN = 1e-6  # optimal mode: γ* never below this (only to keep log γ finite); counted when hit


def init_gamma(module: nn.Module, mode: str) -> None:
    """Give `module` its `log_gamma` (γ = 1 at the start): a parameter (learned) or buffers (optimal)."""
    if mode not in GAMMA_MODES:
        raise ValueError(f"gamma must be one of {GAMMA_MODES}; got {mode!r}")
    module.gamma_mode = mode
    if mode == "learned":
        module.log_gamma = nn.Parameter(torch.zeros(()))
    else:
        module.register_buffer("log_gamma", torch.zeros(()))
        module.register_buffer("gamma_ema", torch.zeros(2, dtype=torch.float64))


def optimal_log_gamma(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log γ*, batch MSE, floored) of the whole (global, under DDP) batch, detached, float32 log γ*.

    γ*² = mean over samples and dimensions of (x − x̂)², floored at GAMMA_MIN² (`floored` says whether).
    """
    sq = (x.detach().float() - x_hat.detach().float()).square()
    sums = torch.stack([sq.double().sum(), torch.tensor(float(sq.numel()), dtype=torch.float64, device=sq.device)])
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(sums)  # every rank calls forward once per step: a safe place for a collective
    mse = sums[0] / sums[1]
    floored = mse < GAMMA_MIN**2
    return 0.5 * torch.log(mse.clamp_min(GAMMA_MIN**2)).float(), mse, floored


def loss_log_gamma(module: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The fp32 log γ the NLL of this batch uses, and metrics: `gamma` (that γ), plus `gamma_floored` (optimal).

    Optimal mode, in training: also moves the EMA behind `log_gamma`.
    """
    if module.gamma_mode == "learned":
        log_gamma = module.log_gamma.float()
        return log_gamma, {"gamma": torch.exp(log_gamma.detach())}
    log_gamma, mse, floored = optimal_log_gamma(x, x_hat)
    if module.training:
        with torch.no_grad():
            module.gamma_ema.mul_(EMA_DECAY).add_(torch.stack([mse, torch.ones_like(mse)]) * (1 - EMA_DECAY))
            ema_mse = (module.gamma_ema[0] / module.gamma_ema[1]).clamp_min(GAMMA_MIN**2)
            module.log_gamma.copy_(0.5 * torch.log(ema_mse))
    return log_gamma, {"gamma": torch.exp(log_gamma), "gamma_floored": floored.float()}
