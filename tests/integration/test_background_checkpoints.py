"""Checkpoints are written in the background: slow storage does not slow the other ranks' steps,
results do not change, and a job killed mid-write resumes exactly from the previous checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.stagerun import REPO, env, kill_job, load_model, tiny_overrides
from tsvae_dist.train.checkpoint import CheckpointStore

DELAY_S = 10.0  # one slow checkpoint write; a synchronous save would stall every rank this long


def command(out: Path, delay: float, hold_from: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "tests.slowstore", str(out), str(delay), str(hold_from), *overrides]


def run(out: Path, delay: float, hold_from: int, overrides: list[str]) -> list[float]:
    proc = subprocess.run(command(out, delay, hold_from, overrides), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(f"{out}.1").read_text())  # rank 1's step times


def test_slow_checkpoint_writes_do_not_slow_training_and_survive_a_kill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    extra = {"dataset.synthetic_train": 640, "stage1.epochs": 2}  # 20 steps an epoch, 40 steps

    # Reference: checkpoints only at the end, storage at full speed.
    reference = tmp_path / "reference"
    fast = run(tmp_path / "fast", 0.0, 0, tiny_overrides(data, reference, **extra,
                                                         **{"stage1.checkpoint_every_steps": 1000}))
    # A checkpoint at step 20 whose write takes DELAY_S: rank 1 must not wait for it.
    slow_dir = tmp_path / "slow"
    slow = run(tmp_path / "slow", DELAY_S, 1, tiny_overrides(data, slow_dir, **extra,
                                                              **{"stage1.checkpoint_every_steps": 20}))
    assert len(fast) == len(slow) == 40
    # Order, not speed: rank 1 took step 21 before rank 0's step-20 write ended. A save that blocked
    # rank 0 would hold rank 1 at step 21's gradient all-reduce until the write had ended.
    writes = {samples: (start, end) for samples, start, end in
              map(json.loads, Path(f"{tmp_path / 'slow'}.writes").read_text().splitlines())}
    _, end = writes[20 * 32]
    assert slow[20] < end, (slow[20], end)
    ref_model = load_model(reference / "stage1" / "model.pt")
    for name, t in load_model(slow_dir / "stage1" / "model.pt").items():  # background writes change nothing
        assert torch.equal(t, ref_model[name]), name
    assert CheckpointStore(str(slow_dir / "stage1" / "checkpoints")).load_latest()["step"] == 40

    # Killed while the step-20 write is in flight: the step-10 checkpoint is the latest, and resumes exactly.
    killed = tmp_path / "killed"
    overrides = tiny_overrides(data, killed, **extra, **{"stage1.checkpoint_every_steps": 10})
    out = tmp_path / "killed-run"
    proc = subprocess.Popen(command(out, 600.0, 20 * 32, overrides), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not Path(f"{out}.writing").exists():
        assert proc.poll() is None, "the run ended before its second checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    kill_job(proc)
    latest = CheckpointStore(str(killed / "stage1" / "checkpoints")).load_latest()
    assert latest is not None and latest["step"] == 10 and latest["complete"]
    run(tmp_path / "resumed", 0.0, 0, overrides)
    for name, t in load_model(killed / "stage1" / "model.pt").items():
        assert torch.equal(t, ref_model[name]), name


def test_timed_checkpoints_land_on_stop_checks_on_every_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "data", run_dir, **{
        "dataset.synthetic_train": 640, "stage1.epochs": 2, "stage1.checkpoint_every_steps": 1000,
        "stage1.keep_checkpoints": 10, "stage1.stop_check_every_steps": 10,
        "stage1.checkpoint_every_min": 0.0001})  # due at every stop check: 6 ms
    proc = subprocess.run(command(tmp_path / "timed", 0.0, 0, overrides), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # ranks disagreeing on a save would hang its collective
    steps = sorted(int(p.stem.split("-")[1]) // 32 for p in (run_dir / "stage1" / "checkpoints").glob("ckpt-*.pt"))
    assert steps == [10, 20, 30, 40]  # the timer's saves at the stop checks, plus the end
