"""Helpers for tests that run stages as real processes (plain, torchrun, or the launcher)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, run_dir: Path, **extra: object) -> list[str]:
    """A pipeline small enough for CPU tests: 512 synthetic 32-px images, a quarter-width InfoGAN."""
    base = {
        "run_dir": run_dir,
        "dataset.root": data_root,
        "dataset.synthetic_train": 512,
        "dataset.synthetic_test": 128,
        "dataset.synthetic_samples_per_shard": 64,
        "model.width": 0.25,
        "model.latent_dim": 8,
        "model.stage2_hidden": 64,
        "stage1.batch_size": 32,
        "stage1.epochs": 2,
        "stage1.lr": 1e-3,
        "stage1.checkpoint_every_steps": 8,
        "stage1.log_every_steps": 4,
        "stage1.progress_bar": False,
        "stage1.loader.streams": 2,
        "stage1.loader.workers": 1,
        "stage2.batch_size": 32,
        "stage2.epochs": 2,
        "stage2.lr": 1e-3,
        "stage2.checkpoint_every_steps": 8,
        "stage2.log_every_steps": 4,
        "stage2.progress_bar": False,
        "stage2.loader.streams": 2,
        "stage2.loader.workers": 1,
        "eval.num_samples": 64,
        "eval.num_test": 128,
        "eval.grid_images": 16,
        "eval.batch_size": 32,
        "cluster.cpus_per_task": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def stage_command(module: str, overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", f"tsvae_dist.{module}", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", f"tsvae_dist.{module}", *overrides]


def run_stage(module: str, overrides: list[str], nproc: int = 1, timeout: int = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_command(module, overrides, nproc), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(path.read_bytes()), weights_only=True)["model"]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and everything under it, like a node lost. (killpg is not enough: torchrun starts
    every rank in a session of its own.) Frozen first, so nothing forks in between."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    proc.wait()


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (under torchrun: its ranks)."""
    return [p for p in descendants(pid) if p != pid and _parent(p) == pid]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
