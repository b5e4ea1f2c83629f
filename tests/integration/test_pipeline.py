"""The default pipeline end to end (tiny setting) through the launcher and submitit's local executor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.stagerun import REPO, env, run_stage, tiny_overrides

REPORT_KEYS = {"reconstruction_mse", "gamma_x", "gamma_z", "active_dims", "frechet_to_prior", "fid", "images",
               "training", "gamma_curves", "paper_table1", "test_images"}


def submit(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "launch/submit.py", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_pipeline_end_to_end_then_skip_done_then_generate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "data", run_dir)
    proc = submit(overrides)
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"report: {run_dir / 'evaluate' / 'report.json'}"

    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["test_images"] == 128
    assert report["active_dims"]["true_dim"] == 4 and report["active_dims"]["latent_dim"] == 8
    assert len(report["active_dims"]["posterior_variance"]) == 8
    assert report["gamma_x"] < 1.0  # γ_x learns (falls from its initial 1) even in two tiny epochs
    assert report["fid"]["status"].startswith("skipped: eval.inception_weights")
    for name in ("reconstructions", "stage1_samples", "stage2_samples"):
        assert (run_dir / "evaluate" / report["images"][name]).stat().st_size > 0
    assert "Two-Stage VAE report" in (run_dir / "evaluate" / "report.md").read_text()
    for stage in ("stage1", "encode", "stage2", "evaluate"):
        m = json.loads((run_dir / stage / "MANIFEST.json").read_text())
        assert m["stage"] == stage and m["produced"] and m["code_revision"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "revision.txt").exists()

    # Re-running the same command skips every finished stage.
    again = submit(overrides)
    for stage in ("stage1", "encode", "stage2", "evaluate"):
        assert f"{stage}: done, skipped" in again.stdout

    # Generate on its own after the run: identical samples for world size 1 and 2.
    one = run_stage("generate", [*overrides, "generate.num=10", f"generate.out={tmp_path / 'g1'}"], nproc=1)
    two = run_stage("generate", [*overrides, "generate.num=10", f"generate.out={tmp_path / 'g2'}"], nproc=2)
    assert one.returncode == two.returncode == 0
    files = sorted(p.name for p in (tmp_path / "g1").iterdir())
    assert len(files) == 10
    for name in files:
        assert (tmp_path / "g1" / name).read_bytes() == (tmp_path / "g2" / name).read_bytes()
