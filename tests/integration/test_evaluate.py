"""The evaluation stage with FID on, end to end on a tiny trained run, with Inception weights made here.

Inception at 299 px costs ~0.2-0.5 s per image on one CPU core, so the FID sets are tiny (8 test
images, 8 samples per set); what is checked is the plumbing: three FIDs, the cached reference
statistics, world-size independence, resuming from partial sums, and the configuration errors.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fidutil import calibrated_inception_state
from tests.stagerun import REPO, env, run_stage, stage_command, tiny_overrides
from tsvae_dist.cli import compose
from tsvae_dist.errors import ConfigError
from tsvae_dist.fid.weights import check_fid_config
from tsvae_dist.runtime.preemption import StopFlag
from tsvae_dist.stages import evaluate

FID_SETS = ("reconstructions", "stage1_samples", "stage2_samples")


def _inception_weights(folder: Path) -> tuple[Path, str]:
    """Random FID Inception weights whose features vary between images (BN calibrated on one batch,
    so eval-mode activations neither explode nor die out), named by the torch.hub rule."""
    tmp = folder / "weights.pth"
    torch.save(calibrated_inception_state(32), tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"pt_inception-test-{sha[:8]}.pth"
    tmp.rename(path)
    return path, sha


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained tiny run (stage 1, encode, stage 2: one epoch each) and FID overrides for it."""
    root = tmp_path_factory.mktemp("evaluate")
    weights, sha = _inception_weights(root)
    overrides = tiny_overrides(root / "data", root / "run", **{
        "stage1.epochs": 1, "stage2.epochs": 1, "eval.num_test": 8, "eval.num_samples": 8, "eval.batch_size": 4,
        "eval.grid_images": 8, "eval.cache_dir": root / "cache", "eval.fid": "required",
        "eval.inception_weights": weights, "eval.checkpoint_every_s": 0, "eval.workers": 1,
    })
    for stage in ("stage1", "encode", "stage2"):
        run_stage(stage, overrides)
    return {"root": root, "run": root / "run", "overrides": overrides, "weights": weights, "sha": sha}


@pytest.fixture
def one_thread():
    """In-process evaluations on one thread, as the stage subprocesses run (OMP_NUM_THREADS=1): on a busy
    2-core machine two OpenMP threads made Inception ~7x slower, and equal threading keeps results equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "evaluate" / "report.json").read_text())


def _reference_files(root: Path) -> list[Path]:
    return sorted((root / "cache" / "fid-reference").glob("*.npz"))


@pytest.fixture(scope="module")
def world1_report(tiny_run):
    """The report of one uninterrupted evaluation at world size 1 (it computes the reference statistics)."""
    run_stage("evaluate", tiny_run["overrides"])
    return _report(tiny_run["run"])


def test_fid_world_1_then_cached_reference_and_world_2(tiny_run, world1_report):
    run_dir, root = tiny_run["run"], tiny_run["root"]
    one = world1_report
    fid = one["fid"]
    assert fid["status"] == "computed" and fid["reference"]["cached"] is False
    for name in FID_SETS:  # three finite, positive, distinct FIDs of 8 images each
        assert 0 < fid[name] < float("inf")
        assert fid["counts"][name] == 8
    assert fid["counts"]["test"] == 8 and len({fid[n] for n in FID_SETS}) == 3
    (reference,) = _reference_files(root)
    assert tiny_run["sha"][:16] in reference.name and "32px-test8" in reference.name
    assert not (run_dir / "evaluate" / "partial").exists()  # removed once the report is committed

    # Report, plots and grids.
    out = run_dir / "evaluate"
    for name in (*FID_SETS, "diagnostics"):
        assert (out / one["images"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| ours |" in markdown and "![diagnostics](diagnostics.png)" in markdown
    assert len(one["active_dims"]["posterior_variance"]) == 8
    assert one["gamma_curves"]["stage1"] and one["gamma_curves"]["stage2"]
    assert one["stage2_curves"]["loss"] and one["stage2_curves"]["gamma"]
    assert one["prior_verdict"].startswith("stage 2 ") and one["stage1_convergence"]["mode"] == "optimal"
    assert "Verdict: stage 2 " in markdown and "## Stage 2 training" in markdown
    err, var, thr = one["stage2_error"], one["active_dims"]["posterior_variance"], one["active_dims"]["threshold"]
    assert len(err["per_dim"]) == 8 and err["total"] == pytest.approx(sum(err["per_dim"])) and err["total"] > 0
    inactive = sum(e for e, v in zip(err["per_dim"], var, strict=True) if v >= thr)
    assert err["share"] == pytest.approx(inactive / err["total"])
    assert f"| share of stage-2 error E[(z − ẑ)²] in inactive dims | {100 * err['share']:.1f}% of" in markdown

    # A later evaluation (world size 2 this time) reads the cached reference, never rewrites it.
    stat = reference.stat()
    shutil.rmtree(out)
    run_stage("evaluate", tiny_run["overrides"], nproc=2)
    two = _report(run_dir)
    assert two["fid"]["reference"] == {"url": str(reference), "cached": True}
    assert "test" not in two["fid"]["counts"]  # no test features were computed
    after = reference.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    for name in FID_SETS:
        assert two["fid"][name] == pytest.approx(fid[name], rel=1e-6)
    for key in ("reconstruction_mse", "gamma_x", "gamma_z"):
        assert two[key] == pytest.approx(one[key], rel=1e-9)
    assert two["frechet_to_prior"]["z"] == pytest.approx(one["frechet_to_prior"]["z"], rel=1e-9)
    assert two["stage2_error"]["per_dim"] == pytest.approx(one["stage2_error"]["per_dim"], rel=1e-9)  # reduced
    assert two["active_dims"]["posterior_variance"] == pytest.approx(one["active_dims"]["posterior_variance"],
                                                                     rel=1e-9)


def test_preempted_evaluation_resumes_from_partial_sums(tiny_run, world1_report, tmp_path):
    """SIGUSR1 once the first of its 3 units (test shard, sample chunks 0 and 1) is saved: the evaluation
    saves its partial sums at the next boundary and raises Preempted; the re-run computes only the rest
    and reports what one uninterrupted evaluation did."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run_dir, ignore=shutil.ignore_patterns("evaluate"))
    overrides = [*tiny_run["overrides"], f"run_dir={run_dir}"]
    partial = run_dir / "evaluate" / "partial" / "rank-00000-of-00001.pt"
    proc = subprocess.Popen(stage_command("evaluate", overrides), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # saved after the first unit; the second takes seconds (8 Inception passes)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "the evaluation finished before the signal: " + err[-2000:]
    # Usually after 2 units; after 1 when the signal lands between the first save and the next boundary.
    stopped = re.search(r"Preempted: evaluate: stopped by SIGUSR1 after ([12]) unit\(s\)", err)
    assert stopped, err[-2000:]
    done = int(stopped.group(1))
    assert torch.load(partial, weights_only=True)["state"]["done"] == ["test-0", "samples-0"][:done]
    assert not (run_dir / "evaluate" / "report.json").exists()

    again = run_stage("evaluate", overrides)
    assert f"rank 0 resumes with {done} of its units done" in again.stderr
    resumed = _report(run_dir)
    for name in FID_SETS:
        assert resumed["fid"][name] == pytest.approx(world1_report["fid"][name], rel=1e-9)
    assert resumed["reconstruction_mse"] == pytest.approx(world1_report["reconstruction_mse"], rel=1e-12)
    assert not partial.exists()


def test_fid_auto_with_missing_weights_reports_what_to_configure(tiny_run, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run_dir, ignore=shutil.ignore_patterns("evaluate"))
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    cfg = compose([*tiny_run["overrides"], f"run_dir={run_dir}", "eval.fid=auto",
                   f"eval.inception_weights={missing}"])
    evaluate.run(cfg, stop=StopFlag())
    report = _report(run_dir)
    status = report["fid"]["status"]
    assert status.startswith("skipped: eval.inception_weights: no file") and str(missing) in status
    assert "set it to the path or URL of pt_inception-2015-12-05-6726825d.pth" in status
    assert not any(name in report["fid"] for name in FID_SETS)
    assert report["samples"] == 0 and "FID status: skipped" in (run_dir / "evaluate" / "report.md").read_text()


def test_fid_required_without_weights_fails_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/submit.py", *tiny_overrides(tmp_path / "data", run_dir),
                           "eval.fid=required"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: eval.inception_weights: eval.fid=required but it is not set")
    assert not run_dir.exists() and not (tmp_path / "data").exists()


def test_fid_required_checks_file_and_hash_before_submitting(tiny_run, tmp_path):
    base = [*tiny_overrides(tmp_path / "data", tmp_path / "run"), "eval.fid=required"]
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(ConfigError, match=r"^eval\.inception_weights: .* does not exist"):
        check_fid_config(compose([*base, f"eval.inception_weights={missing}"]))
    with pytest.raises(ConfigError, match=r"^eval\.inception_weights: .* has SHA-256"):
        check_fid_config(compose([*base, f"eval.inception_weights={tiny_run['weights']}",
                                  f"eval.inception_sha256={'0' * 64}"]))
    with pytest.raises(ConfigError, match="eval.inception_sha256"):  # no hash in the name, none configured
        unnamed = tmp_path / "inception.pth"
        unnamed.write_bytes(b"x")
        check_fid_config(compose([*base, f"eval.inception_weights={unnamed}"]))
    check_fid_config(compose([*base, f"eval.inception_weights={tiny_run['weights']}"]))
    check_fid_config(compose([*base, f"eval.inception_weights={tiny_run['weights']}",
                              f"eval.inception_sha256={tiny_run['sha']}"]))


def test_plan_units_covers_first_n_test_images_then_sample_chunks():
    shards = [{"count": 5}, {"count": 5}, {"count": 5}]
    assert evaluate.plan_units(shards, 10, 7, 3) == [("test", 0), ("test", 1), ("samples", 0), ("samples", 1),
                                                     ("samples", 2)]
    assert evaluate.plan_units(shards, 11, 0, 3) == [("test", 0), ("test", 1), ("test", 2)]


def test_markdown_puts_paper_table1_beside_ours():
    report = {
        "dataset": "mnist", "run_dir": "r", "test_images": 10000, "samples": 10000, "reconstruction_mse": 0.01,
        "gamma_x": 0.05, "gamma_z": 0.3, "frechet_to_prior": {"z": 1.0, "u": 0.1},
        "active_dims": {"threshold": 0.1, "count": 12, "latent_dim": 64, "true_dim": None},
        "fid": {"status": "computed", "reconstructions": 8.0, "stage1_samples": 50.0, "stage2_samples": 13.0,
                "reference": {"url": "cache/x.npz", "cached": True}},
        "paper_table1": evaluate.PAPER_TABLE1["mnist"], "images": {"diagnostics": "diagnostics.png"},
    }
    text = evaluate.render_markdown(report)
    assert "| ours | 8 | 50 | 13 |" in text
    assert "VAE (learned γ) 54.5 | 2-Stage VAE 12.6 |" in text and "Table 2" not in text
    assert "`cache/x.npz` (cached)" in text
    text = evaluate.render_markdown({**report, "dataset": "celeba64", "paper_table1": evaluate.PAPER_TABLE1["celeba64"],
                                     "paper_table2": evaluate.PAPER_TABLE2["celeba64"]})
    assert "VAE (learned γ) 60.5 | 2-Stage VAE 44.4 |" in text and "(WAE nets) | | VAE 63 | 2-Stage VAE 34 |" in text


def test_plot_png_draws_gamma_curves_and_variances():
    png = evaluate.plot_png({"stage1": [[0, 1.0], [64, 0.5]], "stage2": [[0, 1.0], [64, 0.8]]},
                            [0.01, 0.5, 1.0, 0.002], 0.1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
