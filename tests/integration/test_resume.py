"""Exact resume on 3 and 4 gloo ranks: a USR1, then a SIGKILL and a re-run, across an epoch boundary
and a learning-rate halving, end bit for bit where an uninterrupted run ends, with the same
metrics.jsonl line for line. With 2 ranks any gradient sum order gives the same sum (a + b = b + a),
so only 3 or more ranks can show a reduction whose order changes after a restart (DDP's buckets)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.stagerun import REPO, children, env, kill_job, load_model, run_stage, stage_command, tiny_overrides
from tsvae_dist.layout import checkpoint_samples

# 8 shards of 64 images; streams a multiple of the world size, dividing the global batch.
WORLDS = {3: {"stage1.batch_size": 48, "stage1.loader.streams": 6},
          4: {"stage1.batch_size": 32, "stage1.loader.streams": 8}}
TIMING_KEYS = ("samples_per_s",)  # wall-clock rates: the only values allowed to differ


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


def metrics_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def checkpoints(run_dir: Path) -> list[int]:
    d = run_dir / "stage1" / "checkpoints"
    return sorted(s for p in d.iterdir() if (s := checkpoint_samples(p.name)) is not None) if d.exists() else []


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, after: int, timeout: float = 300) -> int:
    """Wait for a committed checkpoint past `after` samples; return its samples."""
    deadline = time.monotonic() + timeout
    while not (done := [s for s in checkpoints(run_dir) if s > after]):
        assert proc.poll() is None, "the run ended before the checkpoint waited for"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    return done[0]


def digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every checkpoint file and of metrics.jsonl."""
    files = [*sorted((run_dir / "stage1" / "checkpoints").iterdir()), run_dir / "stage1" / "metrics.jsonl"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("world", [3, 4])
def test_usr1_then_sigkill_resumes_bit_for_bit(tmp_path: Path, data_root: Path, world: int) -> None:
    extra = {**WORLDS[world], "stage1.epochs": 4, "stage1.lr_halve_every_epochs": 2,
             "stage1.checkpoint_every_steps": 6, "stage1.log_every_steps": 3,
             # The signal must land inside the first 10-step epoch: agree on it every step (default 10).
             "stage1.stop_check_every_steps": 1}
    reference = tmp_path / "reference"
    run_stage("stage1", tiny_overrides(data_root, reference, **extra), nproc=world)

    run = tmp_path / "interrupted"
    overrides = tiny_overrides(data_root, run, **extra)
    command = stage_command("stage1", overrides, nproc=world)

    # 1. USR1 to one rank after the first checkpoint: every rank stops at the same step and saves.
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    first = wait_for_checkpoint(proc, run, after=0)
    ranks = children(proc.pid)
    assert len(ranks) == world
    os.kill(ranks[-1], signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by SIGUSR1" in out, out[-3000:]
    stopped = checkpoints(run)[-1]
    assert stopped >= first
    assert not (run / "stage1" / "model.pt").exists(), "stopped too late: the run had finished"
    steps_per_epoch = metrics_lines(reference)[-1]["step"] // 4
    assert stopped // extra["stage1.batch_size"] < steps_per_epoch, "the resumed part must cross an epoch"

    # 2. A refused resume (a changed setting) leaves every checkpoint and the metrics byte-identical.
    before = digests(run)
    refused = run_stage("stage1", tiny_overrides(data_root, run, **extra, **{"stage1.adam_beta2": 0.99}),
                        nproc=1, check=False)
    assert refused.returncode != 0 and "stage1.adam_beta2" in refused.stderr
    assert digests(run) == before

    # 3. Resume, SIGKILL everything after the next checkpoint, like a node lost.
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_for_checkpoint(proc, run, after=stopped)
    kill_job(proc)
    assert not (run / "stage1" / "model.pt").exists(), "killed too late: the run had finished"

    # 4. The same command again finishes; weights and metrics equal the uninterrupted run's exactly.
    resumed = run_stage("stage1", overrides, nproc=world)
    assert "resuming from" in resumed.stderr + resumed.stdout
    ref_model, model = load_model(reference / "stage1" / "model.pt"), load_model(run / "stage1" / "model.pt")
    assert ref_model.keys() == model.keys()
    differ = [k for k in model if not (model[k].dtype == ref_model[k].dtype and (model[k] == ref_model[k]).all())]
    assert not differ, f"{len(differ)} of {len(model)} tensors differ: {differ[:5]}"
    ref_lines, lines = metrics_lines(reference), metrics_lines(run)
    assert [m["step"] for m in lines] == [m["step"] for m in ref_lines]
    assert lines == ref_lines
    assert {m["lr"] for m in lines} == {1e-3, 5e-4}  # the halving happened inside the compared run
