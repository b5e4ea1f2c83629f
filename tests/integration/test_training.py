"""The distributed trainer: world-size parity, exact resume after SIGKILL, refusal of changed configs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.stagerun import REPO, env, kill_job, load_model, run_stage, stage_command, tiny_overrides


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


def metrics(run_dir: Path, stage: str = "stage1") -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def assert_state_dicts_equal(a: dict, b: dict, exact: bool, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=f"{k} differs")


def test_one_vs_two_processes_same_losses_and_parameters(tmp_path: Path, data_root: Path) -> None:
    """Same global batch and seed: 1 process and 2 gloo processes (SyncBatchNorm on) agree.

    Adam divides each gradient component by its own magnitude, so a component whose exact value is
    ~0 moves by ±lr with the sign of its rounding error: a larger adam_eps keeps the update continuous
    in the gradient, so rounding differences (a 2-way all-reduce sums in another order) stay small
    over the steps compared.
    """
    extra = {"stage1.log_every_steps": 1, "stage1.sync_bn": "on", "stage1.epochs": 1, "stage1.adam_eps": 1e-3,
             "stage1.checkpoint_every_steps": 4, "stage1.keep_checkpoints": 4,
             "stage1.gamma": "learned"}  # the tolerances below are for γ ≈ 1; optimal γ: tests/test_gamma.py
    one, two = tmp_path / "one", tmp_path / "two"
    run_stage("stage1", tiny_overrides(data_root, one, **extra), nproc=1)
    run_stage("stage1", tiny_overrides(data_root, two, **extra), nproc=2)
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 16  # 512 images / batch 32
    for key in ("loss", "kl", "nll", "mse", "gamma"):  # step 1: the same forward pass on the same batch
        assert m1[0][key] == pytest.approx(m2[0][key], rel=1e-6), key
    for a, b in zip(m1[:8], m2[:8], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3), a["step"]
    # Parameters after 4 steps (the checkpoint at 128 samples): equal to well within one Adam step (lr 1e-3).
    ckpt = "stage1/checkpoints/ckpt-000000000128.pt"
    p1 = torch.load(one / ckpt, weights_only=True)["model"]
    p2 = torch.load(two / ckpt, weights_only=True)["model"]
    assert_state_dicts_equal(p1, p2, exact=False, rtol=0.0, atol=5e-4)


def test_sigkill_then_rerun_resumes_bit_for_bit(tmp_path: Path, data_root: Path) -> None:
    extra = {"stage1.epochs": 4, "stage1.checkpoint_every_steps": 8}
    reference = tmp_path / "reference"
    run_stage("stage1", tiny_overrides(data_root, reference, **extra), nproc=2)

    killed = tmp_path / "killed"
    overrides = tiny_overrides(data_root, killed, **extra)
    proc = subprocess.Popen(stage_command("stage1", overrides, nproc=2), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_dir = killed / "stage1" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpt_dir.exists() and any(p.suffix == ".pt" for p in ckpt_dir.iterdir())):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kill_job(proc)
    assert not (killed / "stage1" / "model.pt").exists(), "killed too late: the run had finished"

    # A changed result-affecting setting is refused, naming the key; nothing is overwritten.
    refused = run_stage("stage1", tiny_overrides(data_root, killed, **extra, **{"stage1.lr": 0.005}), nproc=1,
                        check=False)
    assert refused.returncode != 0
    assert "stage1.lr" in refused.stderr

    # Re-running the same command resumes (world size 2 again) and ends where the reference ended.
    resumed = run_stage("stage1", overrides, nproc=2)
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert_state_dicts_equal(load_model(reference / "stage1" / "model.pt"), load_model(killed / "stage1" / "model.pt"),
                             exact=True)
    steps = [m["step"] for m in metrics(killed)]
    assert steps == sorted(set(steps)), "metrics lines past the checkpoint must be replaced, not duplicated"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_loss_terms(tmp_path: Path, data_root: Path, precision: str) -> None:
    extra = {"stage1.precision": precision, "stage1.epochs": 1, "stage1.log_every_steps": 4}
    run_stage("stage1", tiny_overrides(data_root, tmp_path / precision, **extra), nproc=1)
    lines = metrics(tmp_path / precision)
    assert len(lines) == 4
    assert all(torch.isfinite(torch.tensor([m["loss"], m["kl"], m["nll"]])).all() for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["gamma"] < 1.0
    state = torch.load(next((tmp_path / precision / "stage1" / "checkpoints").iterdir()), weights_only=True)
    assert state["scaler"] == {} if precision == "bf16" else state["scaler"]["scale"] > 0  # GradScaler: fp16 only


def test_one_vs_three_processes_agree_tightly_with_default_adam_eps(tmp_path: Path, data_root: Path) -> None:
    """1 vs 3 ranks with Adam's default eps (1e-8): step 1 is the same forward pass and step 2 follows one
    Adam step from gradients that differ only by the rounding of a 3-way sum, so the losses agree to
    ~1e-7 relative. (A reduction that dropped or double-counted a rank's share would be off by ~1e-2.)"""
    extra = {"stage1.log_every_steps": 1, "stage1.sync_bn": "on", "stage1.epochs": 1, "stage1.batch_size": 48,
             "stage1.loader.streams": 6, "stage1.checkpoint_every_steps": 100}
    one, three = tmp_path / "one", tmp_path / "three"
    run_stage("stage1", tiny_overrides(data_root, one, **extra), nproc=1)
    run_stage("stage1", tiny_overrides(data_root, three, **extra), nproc=3)
    m1, m3 = metrics(one), metrics(three)
    assert len(m1) == len(m3) > 2
    for key in ("loss", "kl", "nll", "mse", "gamma"):
        assert m1[0][key] == pytest.approx(m3[0][key], rel=1e-7, abs=0), f"step 1 {key}"
    for key in ("loss", "nll", "mse", "gamma"):
        assert m1[1][key] == pytest.approx(m3[1][key], rel=2e-7, abs=0), f"step 2 {key}"
    assert m1[1]["kl"] == pytest.approx(m3[1]["kl"], rel=1e-6), "step 2 kl"
