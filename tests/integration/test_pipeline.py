"""The default pipeline end to end (tiny setting) through the launcher and submitit's local executor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.datautil import build_images
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


def test_a_run_allowing_skips_shows_progress_and_tools_read_its_saved_config(tmp_path: Path) -> None:
    """One skip policy for every stage reading the images; a local run's live progress and final table;
    FID skipped said last; `generate run_dir=RUN` alone uses the run's own config."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    build_images(str(data), train=512, test=128, per_shard=64, resolution=32)
    (data / "train" / "shard-000002.tar").write_bytes(b"not a tar")  # 64 bad training samples
    (data / "test" / "shard-000001.tar").write_bytes(b"not a tar")  # 64 bad test samples (encode: 128 in all)
    proc = submit(tiny_overrides(data, run_dir, **{"stage1.loader.max_skipped_samples": 64}))
    out = proc.stdout

    # Progress: a line per stage as it finishes (live ones in between), then the table of stages.
    assert re.search(r"^stage1: finished in \d+:\d\d: 1024/1024 samples, \d+ samples/s, loss \S+, γ \S+$", out, re.M)
    assert re.search(r"^stage2: finished in \d+:\d\d: (\d+)/\1 samples, \d+ samples/s, loss \S+, γ \S+$", out, re.M)
    assert re.search(r"^encode: finished in \d+:\d\d: 10/10 shards$", out, re.M)
    assert re.search(r"^stage\s+state\s+time\s+progress\n(stage1|encode|stage2|evaluate)\s+finished", out, re.M)
    lines = out.strip().splitlines()
    assert lines[-2].startswith("fid: skipped: eval.inception_weights is not set"), lines[-3:]

    # The same skip policy in encode and evaluate, counted in each record and the report.
    records = {s: json.loads((run_dir / s / "MANIFEST.json").read_text()) for s in ("stage1", "encode", "evaluate")}
    assert records["stage1"]["skipped_samples"] > 0
    assert records["encode"]["skipped_samples"] == 128 and records["evaluate"]["skipped_samples"] == 64
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["skipped_samples"] == 64 and report["test_images"] == 64
    assert "skipped 64 bad sample(s)" in "".join(p.read_text() for p in run_dir.glob("logs/*/*_log.err"))
    markdown = (run_dir / "evaluate" / "report.md").read_text()
    assert "0 samples per FID set" not in markdown and "no FID sets (FID skipped" in markdown

    # Generate from the run alone: the dataset, model and seed come from run_dir/config.yaml.
    run_stage("generate", [f"run_dir={run_dir}", "generate.num=3", f"generate.out={tmp_path / 'g'}"])
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    wrong = run_stage("generate", [f"run_dir={run_dir}", "model.width=0.5"], check=False)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr[-2000:]
    assert wrong.stderr.strip().splitlines() == [
        f"error: generate: {run_dir}/stage1/model.pt: the stage1 model was trained with model.width=0.25 "
        "(config: 0.5); use the run's own settings (its config.yaml)"]
