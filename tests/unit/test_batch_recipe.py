"""The batch recipe: per-rank batch, gradient accumulation, lr scaling and warmup, their validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tsvae_dist.cli import compose
from tsvae_dist.config import TrainConfig
from tsvae_dist.errors import ConfigError
from tsvae_dist.train import precision
from tsvae_dist.train.loop import accumulate, accumulation_rounds, batch_gpu, learning_rate, use_sync_bn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mse = (self.net(x) - x).pow(2).mean()
        return {"loss": mse, "mse": mse}


def test_warmup_and_scaling_schedule() -> None:
    cfg = TrainConfig(lr=1e-4, batch_size=256, lr_halve_every_epochs=10, warmup_steps=4, lr_scaling="linear")
    assert [learning_rate(cfg, 0, s) for s in range(5)] == pytest.approx([1e-4 * 4 * f for f in (.25, .5, .75, 1, 1)])
    assert learning_rate(cfg, 10, 1000) == pytest.approx(1e-4 * 4 * 0.5)  # halving still applies
    sqrt = TrainConfig(lr=1e-4, batch_size=256, lr_scaling="sqrt")
    assert learning_rate(sqrt, 0, 0) == pytest.approx(1e-4 * 2)
    paper = TrainConfig()  # batch 64, lr 1e-4, no scaling, no warmup
    assert learning_rate(paper, 0, 0) == 1e-4 and learning_rate(paper, 150, 0) == 5e-5


def test_rounds_and_sync_bn_follow_the_per_rank_batch() -> None:
    cfg = TrainConfig(batch_size=256, batch_gpu=16)
    assert (batch_gpu(cfg, 4), accumulation_rounds(cfg, 4)) == (16, 4)
    assert accumulation_rounds(TrainConfig(batch_size=256), 4) == 1
    assert use_sync_bn(cfg, 4)  # 16 per pass: BN needs the global batch
    assert not use_sync_bn(TrainConfig(batch_size=512), 4)  # 128 per rank, no accumulation
    assert use_sync_bn(TrainConfig(batch_size=512, batch_gpu=32), 4)  # 128 per rank but 32 per pass


def test_accumulation_gives_the_one_batch_update() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(32, 6)
    other = copy.deepcopy(model)
    scaler = precision.grad_scaler("fp32", torch.device("cpu"))
    one = model(x)
    one["loss"].backward()
    terms = accumulate(other, [x], 4, "fp32", torch.device("cpu"), scaler)
    torch.testing.assert_close(terms["loss"], one["loss"].detach(), rtol=1e-6, atol=0)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8)
    for m in (model, other):
        torch.optim.Adam(m.parameters(), lr=1e-2).step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("override", "key"), [
    (["stage1.batch_gpu=48"], "stage1.batch_gpu"),  # 64 is not 48 x 1 x rounds
    (["stage1.batch_gpu=-1"], "stage1.batch_gpu"),
    (["stage1.lr_scaling=cubic"], "stage1.lr_scaling"),
    (["stage1.lr_reference_batch=0"], "stage1.lr_reference_batch"),
    (["stage2.warmup_steps=-3"], "stage2.warmup_steps"),
])
def test_batch_recipe_validation_names_the_key(override: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["cluster.tasks_per_node=1", *override])


def test_a_valid_accumulation_recipe_composes() -> None:
    cfg = compose(["cluster.tasks_per_node=1", "stage1.batch_gpu=16", "stage1.warmup_steps=100"])
    assert accumulation_rounds(cfg.stage1, 1) == 4


def test_stage1_trains_with_accumulation_and_warmup(tmp_path) -> None:
    import json

    from tests.stagerun import tiny_overrides
    from tsvae_dist.stages import stage1

    torch.set_num_threads(1)
    cfg = compose(tiny_overrides(tmp_path / "data", tmp_path / "run", **{
        "stage1.epochs": 1, "stage1.loader.workers": 0, "stage1.batch_gpu": 8, "stage1.warmup_steps": 8,
        "stage1.log_every_steps": 4, "stage1.lr_scaling": "linear", "stage1.lr_reference_batch": 64,
        "cluster.tasks_per_node": 1}))
    assert accumulation_rounds(cfg.stage1, 1) == 4  # 32 per step in 4 passes of 8
    stage1.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # lr 1e-3 x 32/64, warmed up over 8 steps: the lr logged is the one of the line's last step (step - 1).
    assert lrs[4] == pytest.approx(0.5e-3 * 4 / 8) and lrs[8] == pytest.approx(0.5e-3) and lrs[16] == pytest.approx(
        0.5e-3)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
