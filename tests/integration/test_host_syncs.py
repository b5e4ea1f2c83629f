"""The training step does not read device values on the host: syncs come per log window, stop check
and checkpoint only (tests/syncs.py counts them in each of 2 gloo ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.stagerun import REPO, env, tiny_overrides


def test_host_syncs_over_100_steps_on_two_ranks(tmp_path: Path) -> None:
    steps, log_every, stop_every, ckpt_every = 100, 20, 10, 50
    overrides = tiny_overrides(
        tmp_path / "data", tmp_path / "run",
        **{"dataset.synthetic_train": 640, "stage1.epochs": 5, "stage1.log_every_steps": log_every,
           "stage1.stop_check_every_steps": stop_every, "stage1.checkpoint_every_steps": ckpt_every,
           "stage1.sync_bn": "on"})  # 640 / 32 = 20 steps an epoch
    out = tmp_path / "syncs.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.syncs", str(out), *overrides],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    windows, stop_checks, checkpoints, epochs = steps // log_every, steps // stop_every, steps // ckpt_every, 5
    # One read per window (the metrics), per stop check (the flag) and per checkpoint (the gathered
    # window state), one per epoch (torch's DataLoader draws its workers' base seed with .item() on the
    # host's generator) and one at the end (the skipped-sample count). A read per step would add 100.
    budget = windows + stop_checks + checkpoints + epochs + 1
    for rank in (0, 1):
        counted = json.loads(Path(f"{out}.{rank}").read_text())
        assert counted["steps"] == steps
        total = sum(counted["counts"].values())
        assert total <= budget, (rank, counted["counts"], counted["sites"], budget)
