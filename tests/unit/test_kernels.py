"""Kernel settings resolved per device: precision auto, memory format, compile, what checkpoints record."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.stagerun import tiny_overrides
from tsvae_dist.cli import compose
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import ConfigError
from tsvae_dist.stages import stage1
from tsvae_dist.train import precision
from tsvae_dist.train.checkpoint import resolved

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")  # device objects need no GPU


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu() -> None:
    assert precision.resolve("auto", CUDA) == "bf16" and precision.resolve("auto", CPU) == "fp32"
    assert precision.resolve("fp16", CPU) == "fp16"  # an explicit setting is kept
    assert RunConfig().stage1.precision == "auto"  # stage 1's default; stage 2 keeps its own
    with precision.autocast("auto", CPU):
        assert not torch.is_autocast_enabled("cpu")  # auto on CPU is plain fp32


def test_memory_format_auto_is_channels_last_only_for_conv_models_on_cuda() -> None:
    conv, mlp = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Linear(4, 4))
    assert precision.resolve_memory_format("auto", conv, CUDA) == "channels_last"
    assert precision.resolve_memory_format("auto", mlp, CUDA) == "contiguous"
    assert precision.resolve_memory_format("auto", conv, CPU) == "contiguous"
    assert precision.resolve_memory_format("channels_last", conv, CPU) == "channels_last"
    images, codes = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8)
    out = precision.to_memory_format(images, "channels_last")
    assert out.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous(
        memory_format=torch.channels_last)
    assert precision.to_memory_format(codes, "channels_last") is codes  # only image batches change layout


def test_memory_format_is_validated() -> None:
    with pytest.raises(ConfigError, match="stage1.memory_format"):
        compose(["stage1.memory_format=nhwc"])
    with pytest.raises(ConfigError, match="stage1.precision"):
        compose(["stage1.precision=tf32"])


def test_resolved_config_replaces_only_the_stage_settings() -> None:
    config = {"seed": 1, "stage1": {"precision": "auto", "tf32": True, "deterministic": False}}
    out = resolved(config, "stage1", precision="bf16", memory_format="channels_last")
    assert out == {"seed": 1, "stage1": {"precision": "bf16", "tf32": True, "deterministic": False,
                                         "memory_format": "channels_last"}}
    assert config["stage1"]["precision"] == "auto"  # the job's own config is not modified


def test_compile_builds_and_matches_eager() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    eager = model(x)
    keys = list(model.state_dict())
    precision.compile_forward(model)
    start = time.perf_counter()
    try:
        compiled = model(x)
    except Exception as e:  # no C++ compiler / unsupported platform: say so rather than pass silently
        pytest.skip(f"torch.compile is not available here: {type(e).__name__}: {e}")
    if time.perf_counter() - start > 60:
        pytest.skip("torch.compile took over 60 s on this machine")
    torch.testing.assert_close(compiled, eager)
    assert list(model.state_dict()) == keys  # checkpoints load into a compiled or an eager model alike


def test_checkpoint_records_resolved_precision_and_memory_format(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = compose(tiny_overrides(tmp_path / "data", tmp_path / "run", **{
        "stage1.epochs": 1, "stage1.loader.workers": 0, "stage1.tf32": True}))
    assert cfg.stage1.precision == "auto" and cfg.stage1.memory_format == "auto"
    stage1.run(cfg)
    ckpt = sorted((tmp_path / "run" / "stage1" / "checkpoints").glob("*.pt"))[-1]
    saved = torch.load(io.BytesIO(ckpt.read_bytes()), weights_only=True)["config"]["stage1"]
    assert (saved["precision"], saved["memory_format"]) == ("fp32", "contiguous")  # CPU's resolution
    assert saved["tf32"] is True and saved["deterministic"] is False and saved["compile"] is False
