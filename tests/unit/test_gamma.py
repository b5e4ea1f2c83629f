"""γ as a choice per stage: the optimal γ's closed form, its minimality, log γ's own Adam rate, config, tiny runs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from tests.stagerun import tiny_overrides
from tsvae_dist.cli import compose
from tsvae_dist.config import TrainConfig
from tsvae_dist.errors import ConfigError
from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.config import ModelConfig
from tsvae_dist.models.gamma import EMA_DECAY, optimal_log_gamma
from tsvae_dist.models.latent_vae import Stage2VAE
from tsvae_dist.models.losses import HALF_LOG_TWO_PI, gaussian_nll
from tsvae_dist.stages import encode, stage1, stage2
from tsvae_dist.stages._common import load_trained
from tsvae_dist.train.loop import param_groups


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 5, 5, generator=g)
    return x, (x + 0.1 * torch.randn(x.shape, generator=g)).requires_grad_()


def test_optimal_gamma_is_the_closed_form():
    x, x_hat = _pair()
    log_gamma, mse, floored = optimal_log_gamma(x, x_hat)
    want_mse = ((x - x_hat.detach()) ** 2).mean().item()
    assert mse.item() == pytest.approx(want_mse, rel=1e-6) and not floored
    assert log_gamma.item() == pytest.approx(0.5 * math.log(want_mse), rel=1e-6)
    assert not log_gamma.requires_grad  # no gradient through γ
    # The NLL at γ*: D/2 + D log γ* + D/2 log 2π per sample, averaged over the batch.
    dims = x[0].numel()
    nll = gaussian_nll(x, x_hat, log_gamma).mean()
    assert nll.item() == pytest.approx(dims * (0.5 + 0.5 * math.log(want_mse) + HALF_LOG_TWO_PI), rel=1e-6)


def test_optimal_gamma_minimises_the_learned_gamma_loss():
    x, x_hat = _pair(1)
    star = optimal_log_gamma(x, x_hat)[0].double()
    log_gamma = star.clone().requires_grad_()
    loss = gaussian_nll(x.double(), x_hat.detach().double(), log_gamma).mean()
    (grad,) = torch.autograd.grad(loss, log_gamma)
    assert abs(grad.item()) < 1e-6 * x[0].numel()  # the derivative in log γ vanishes at γ*
    scan = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64) + star
    values = torch.stack([gaussian_nll(x.double(), x_hat.detach().double(), s).mean() for s in scan])
    assert int(values.argmin()) == 100  # the scan's centre, γ*, is its minimum

    # Envelope theorem: detaching γ* gives the gradient in x̂ of the loss minimised over γ.
    g_detached = torch.autograd.grad(gaussian_nll(x, x_hat, optimal_log_gamma(x, x_hat)[0]).mean(), x_hat)[0]
    attached = 0.5 * torch.log((x - x_hat).square().mean())
    g_through = torch.autograd.grad(gaussian_nll(x, x_hat, attached).mean(), x_hat)[0]
    torch.testing.assert_close(g_detached, g_through, rtol=1e-4, atol=1e-7)


def test_optimal_mode_models_use_gamma_star_and_track_it_in_log_gamma():
    torch.manual_seed(0)
    model = Stage2VAE(latent_dim=4, hidden=16, depth=2, gamma="optimal")
    assert "log_gamma" not in dict(model.named_parameters()) and "log_gamma" in dict(model.named_buffers())
    z, eps = torch.randn(8, 4), torch.randn(8, 4)
    out = model(z, eps)
    torch.testing.assert_close(out["gamma"], out["mse"].sqrt(), rtol=1e-5, atol=0)
    out["loss"].backward()
    # The first update's bias-corrected EMA is the batch's own MSE.
    torch.testing.assert_close(model.log_gamma.exp(), out["mse"].sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(model.gamma_ema, torch.tensor([out["mse"].item(), 1.0], dtype=torch.float64)
                               * (1 - EMA_DECAY), rtol=1e-6, atol=0)
    assert out["gamma_floored"].item() == 0.0
    model.eval()  # evaluation reads γ but never moves it
    before = model.log_gamma.clone()
    model(z * 3, eps)
    assert torch.equal(model.log_gamma, before)

    image_model = build_stage1(ModelConfig(family="infogan", latent_dim=8, width=0.125), 1, 16, gamma="optimal")
    out = image_model(torch.rand(3, 1, 16, 16), torch.randn(3, 8))
    torch.testing.assert_close(out["gamma"], out["mse"].sqrt(), rtol=1e-5, atol=0)
    assert "log_gamma" in image_model.state_dict()


def test_gamma_lr_makes_its_own_param_group():
    model = Stage2VAE(latent_dim=4, hidden=16, depth=2)
    assert len(param_groups(model, TrainConfig(lr=1e-3))) == 1
    groups = param_groups(model, TrainConfig(lr=1e-3, gamma_lr=1e-2))
    assert [g["lr_scale"] for g in groups] == [1.0, pytest.approx(10.0)]
    assert groups[1]["params"] == [model.log_gamma]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimal = Stage2VAE(latent_dim=4, hidden=16, depth=2, gamma="optimal")
    assert len(param_groups(optimal, TrainConfig(lr=1e-3))) == 1
    # Used: Adam's first step moves each parameter by its group's lr (here scaled as the trainer does).
    opt = torch.optim.Adam(groups, lr=1e-3)
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    before = [p.detach().clone() for p in (model.log_gamma, model.decoder.z_hat.bias)]
    model(torch.randn(8, 4) * 3, torch.randn(8, 4))["loss"].backward()
    opt.step()
    moved = [(p.detach() - b).abs().max().item() for p, b in zip((model.log_gamma, model.decoder.z_hat.bias), before,
                                                                   strict=True)]
    assert moved == [pytest.approx(1e-2, rel=1e-3), pytest.approx(1e-3, rel=1e-3)]


@pytest.mark.parametrize(
    ("override", "message"),
    [("stage1.gamma=fixed", "stage1.gamma"), ("stage2.gamma=Optimal", "stage2.gamma"),
     ("stage1.gamma_lr=-1e-3", "stage1.gamma_lr"), ("stage2.gamma_lr=0.01", "stage2.gamma_lr")],
)
def test_config_validation_names_the_field(override: str, message: str):
    extra = ["stage2.gamma=optimal"] if override.startswith("stage2.gamma_lr") else []
    with pytest.raises(ConfigError, match=message):
        compose([override, *extra])


def test_optimal_gamma_with_cross_entropy_decoder_is_refused():
    with pytest.raises(ConfigError, match="stage1.gamma"):
        compose(["stage1.gamma=optimal", "model.decoder=cross_entropy"])


def _state(path: Path) -> dict:
    return torch.load(io.BytesIO(path.read_bytes()), weights_only=True)


@pytest.mark.parametrize("mode", ["learned", "optimal"])
def test_tiny_pipeline_trains_in_each_gamma_mode(tmp_path: Path, mode: str):
    torch.set_num_threads(1)
    extra = {"stage1.gamma": mode, "stage2.gamma": mode, "stage1.epochs": 1, "stage2.epochs": 1,
             "stage1.loader.workers": 0, "stage2.loader.workers": 0, "eval.workers": 0}
    if mode == "learned":
        extra["stage2.gamma_lr"] = 0.05
    run = tmp_path / "run"
    cfg = compose(tiny_overrides(tmp_path / "data", run, **extra))
    stage1.run(cfg)
    encode.run(cfg)
    stage2.run(cfg)
    other = "learned" if mode == "optimal" else "optimal"
    other_cfg = compose(tiny_overrides(tmp_path / "data", run, **{**extra, "stage1.gamma": other,
                                                                   "stage2.gamma": other, "stage2.gamma_lr": 0}))
    for stage in ("stage1", "stage2"):
        model = load_trained(cfg, stage)  # the evaluate/generate path
        gamma = model.log_gamma.exp().item()
        assert 0.0 < gamma < 1.0, (stage, gamma)  # from 1 at the start, in both modes
        # The artifact, not the config, decides the γ mode it is rebuilt in (its state dict's keys).
        assert load_trained(other_cfg, stage).log_gamma.exp().item() == gamma
    ckpt = sorted((run / "stage2" / "checkpoints").glob("*.pt"))[-1]
    groups = _state(ckpt)["optimizer"]["param_groups"]
    if mode == "learned":
        assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(0.05)]  # what Adam stepped with
    else:
        assert len(groups) == 1
        body = _state(run / "stage2" / "model.pt")["model"]
        ema = body["gamma_ema"]
        assert body["log_gamma"].item() == pytest.approx(0.5 * math.log(ema[0].item() / ema[1].item()), rel=1e-5)


@pytest.mark.integration  # starts processes
def test_optimal_gamma_is_the_global_batch_one_under_ddp(tmp_path: Path):
    """1 process and 2 gloo processes, same global batch: the same γ* (squared errors summed over ranks)."""
    import json

    from tests.stagerun import run_stage

    extra = {"stage1.gamma": "optimal", "stage1.epochs": 1, "stage1.log_every_steps": 1, "stage1.sync_bn": "on",
             "stage1.adam_eps": 1e-3, "stage1.checkpoint_every_steps": 4, "stage1.keep_checkpoints": 4}
    runs = {n: tmp_path / f"w{n}" for n in (1, 2)}
    for n, run_dir in runs.items():
        run_stage("stage1", tiny_overrides(tmp_path / "data", run_dir, **extra), nproc=n)
    m1, m2 = ([json.loads(ln) for ln in (d / "stage1" / "metrics.jsonl").read_text().splitlines()]
              for d in runs.values())
    assert m1[0]["gamma"] == pytest.approx(m2[0]["gamma"], rel=1e-6)  # step 1: the same forward pass
    assert m1[0]["gamma"] == pytest.approx(math.sqrt(m1[0]["mse"]), rel=1e-5)
    # Later steps differ by rounding only (a 2-way all-reduce sums in another order), amplified more than
    # with a learned γ ≈ 1 since the reconstruction gradient scales as 1/γ*²: seen up to 2e-5 by step 7.
    for a, b in zip(m1[:8], m2[:8], strict=True):
        assert a["gamma"] == pytest.approx(b["gamma"], rel=1e-4), a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    ckpt = "stage1/checkpoints/ckpt-000000000128.pt"  # after 4 steps
    p1, p2 = (_state(d / ckpt)["model"] for d in runs.values())
    assert p1.keys() == p2.keys() and {"log_gamma", "gamma_ema"} <= p1.keys()
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-5 if "gamma" in k else 0.0, atol=5e-4, msg=k)
