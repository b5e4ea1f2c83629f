"""Failing fast: NCCL's async error handling before init, and the collective timeout shortened after
the first step (a real 2-process gloo group shows a waiting rank fails within the short timeout)."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from tsvae_dist.cli import compose
from tsvae_dist.errors import ConfigError
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.dist import NCCL_ASYNC_ERROR_VARS, DistInfo

CPU = torch.device("cpu")


def test_nccl_async_error_handling_is_set_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    dist.enable_nccl_async_errors(env)
    assert env == {name: "1" for name in NCCL_ASYNC_ERROR_VARS}
    chosen = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    dist.enable_nccl_async_errors(chosen)
    assert chosen == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_ASYNC_ERROR_HANDLING": "1"}


def test_gpu_init_sets_async_errors_before_the_process_group_and_passes_the_start_timeout(monkeypatch) -> None:
    """No GPU needed: CUDA and the process group are faked; what matters is the environment at init."""
    for name in NCCL_ASYNC_ERROR_VARS:
        monkeypatch.setenv(name, "")  # recorded, so what init exports is removed after the test
        monkeypatch.delenv(name)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    seen: dict = {}

    def fake_init(**kwargs) -> None:
        seen.update(kwargs, env={name: os.environ.get(name) for name in NCCL_ASYNC_ERROR_VARS})

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", fake_init)
    info = dist.init(use_gpu=True, timeout_s=1234, collective_timeout_s=56)
    assert seen["backend"] == "nccl" and seen["timeout"] == datetime.timedelta(seconds=1234)
    assert seen["env"] == {name: "1" for name in NCCL_ASYNC_ERROR_VARS}
    assert info.collective_timeout_s == 56 and info.rank == 1


def test_shorten_timeout_says_why_not(monkeypatch) -> None:
    assert dist.shorten_timeout(DistInfo(0, 1, 0, CPU, 300)) == "no process group"
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    assert "collective_timeout_s is 0" in dist.shorten_timeout(DistInfo(0, 2, 0, CPU, 0))
    calls = []
    monkeypatch.setattr(torch_dist.distributed_c10d, "_set_pg_timeout", calls.append)
    assert dist.shorten_timeout(DistInfo(0, 2, 0, CPU, 300)) is None
    assert calls == [datetime.timedelta(seconds=300)]
    monkeypatch.delattr(torch_dist.distributed_c10d, "_set_pg_timeout")  # an older torch
    assert "_set_pg_timeout" in dist.shorten_timeout(DistInfo(0, 2, 0, CPU, 300))


def _waiting_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                  timeout=datetime.timedelta(seconds=600))
    info = DistInfo(rank, 2, 0, CPU, collective_timeout_s=3)
    dist.all_reduce_sum(torch.ones(1))  # the first step: both ranks answer
    assert dist.shorten_timeout(info) is None
    if rank == 1:  # stuck, alive, never joining the next collective (until rank 0 is done, at most 60 s)
        deadline = time.monotonic() + 60
        while not Path(out_dir, "rank0").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)
    started = time.monotonic()
    try:
        dist.all_reduce_sum(torch.ones(1))
        outcome = "returned"
    except RuntimeError as e:
        outcome = f"raised {type(e).__name__}"
    Path(out_dir, "rank0").write_text(f"{outcome} {time.monotonic() - started:.1f}")
    os._exit(0)  # no teardown collective with the stuck peer


@pytest.mark.integration  # starts processes
def test_after_the_first_step_a_rank_waiting_for_a_stuck_peer_fails_within_the_short_timeout(tmp_path) -> None:
    mp.spawn(_waiting_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outcome, took = (tmp_path / "rank0").read_text().rsplit(" ", 1)
    took = float(took)
    assert outcome.startswith("raised"), outcome
    assert 2.5 <= took < 30, took  # the 3 s timeout, not the 600 s start-up one


def test_collective_timeouts_are_validated() -> None:
    cfg = compose([])
    assert cfg.cluster.init_timeout_s == 1800 and cfg.cluster.collective_timeout_s == 300
    with pytest.raises(ConfigError, match=r"^cluster\.collective_timeout_s: must be >= 0"):
        compose(["cluster.collective_timeout_s=-1"])
    with pytest.raises(ConfigError, match=r"^cluster\.init_timeout_s: must be positive"):
        compose(["cluster.init_timeout_s=0"])
