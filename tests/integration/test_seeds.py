"""`launch/submit.py seeds=2` on a tiny setting: two pipelines, then the aggregate; skip-done and resume."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stagerun import REPO, env, tiny_overrides

pytestmark = pytest.mark.integration


def submit(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "launch/submit.py", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_two_seeds_then_the_aggregate_then_skip_done_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "data", run_dir, seeds=2, seed=11, **{
        "stage1.epochs": 1, "stage2.epochs": 1, "cluster.tasks_per_node": 1})
    proc = submit(overrides)
    assert proc.stdout.strip().splitlines()[-1] == f"report: {run_dir / 'aggregate' / 'report.json'}"

    # Each seed is a whole run of its own, with its own seed.
    reports = []
    for k in range(2):
        seed_dir = run_dir / f"seed-{k}"
        reports.append(json.loads((seed_dir / "evaluate" / "report.json").read_text()))
        assert reports[-1]["run_dir"] == str(seed_dir)
        for stage in ("stage1", "encode", "stage2", "evaluate"):
            record = json.loads((seed_dir / stage / "MANIFEST.json").read_text())
            assert record["config"]["seed"] == 11 + k and record["config"]["run_dir"] == str(seed_dir)
    assert reports[0]["gamma_x"] != reports[1]["gamma_x"]  # different seeds train differently

    # The aggregate: mean ± sample std of the two seeds' numbers.
    agg_path = run_dir / "aggregate" / "report.json"
    agg = json.loads(agg_path.read_text())
    assert agg["seeds"] == [11, 12]
    for name, values in {"gamma_x": [r["gamma_x"] for r in reports], "gamma_z": [r["gamma_z"] for r in reports],
                         "reconstruction_mse": [r["reconstruction_mse"] for r in reports],
                         "active_dims": [r["active_dims"]["count"] for r in reports],
                         "frechet_z": [r["frechet_to_prior"]["z"] for r in reports],
                         "frechet_u": [r["frechet_to_prior"]["u"] for r in reports]}.items():
        m = agg["metrics"][name]
        assert m["mean"] == pytest.approx(statistics.mean(values)), name
        assert m["std"] == pytest.approx(statistics.stdev(values)), name
    assert agg["metrics"]["fid_stage2_samples"]["n"] == 0  # no Inception weights here: FID skipped, said so
    md = (run_dir / "aggregate" / "report.md").read_text()
    assert "over 2 seeds" in md and "| ours, 2 seeds |" in md and "± " in md
    assert (run_dir / "aggregate" / "MANIFEST.json").exists()

    # Re-running the same command skips every seed and the aggregate.
    again = submit(overrides)
    assert "seed-0 (seed 11): done, skipped" in again.stdout and "seed-1 (seed 12): done, skipped" in again.stdout
    assert "aggregate: done, skipped" in again.stdout
    assert json.loads(agg_path.read_text()) == agg

    # A deleted aggregate record: the aggregate is redone (from the seeds' reports), the seeds are not.
    (run_dir / "aggregate" / "MANIFEST.json").unlink()
    agg_path.unlink()
    resumed = submit(overrides)
    assert "seed-0 (seed 11): done, skipped" in resumed.stdout and "aggregate: done, skipped" not in resumed.stdout
    assert json.loads(agg_path.read_text()) == agg and (run_dir / "aggregate" / "MANIFEST.json").exists()
