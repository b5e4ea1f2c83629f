"""report.py over fake report content and fake metrics logs: the test split line, the convergence warning,
the stage-2 curves and the q(u) vs q(z) verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tsvae_dist.layout import RunLayout
from tsvae_dist.report import (
    curve,
    gamma_convergence,
    plot_png,
    prior_verdict,
    read_metrics,
    render_markdown,
    split_info,
    stage2_inactive_error,
)


def _report(**over: Any) -> dict[str, Any]:
    report = {
        "dataset": "folder", "run_dir": "runs/x", "test_images": 40, "samples": 0, "reconstruction_mse": 0.01,
        "gamma_x": 0.1, "gamma_z": 0.5,
        "active_dims": {"count": 4, "latent_dim": 16, "threshold": 0.05, "true_dim": None},
        "frechet_to_prior": {"z": 0.24, "u": 0.12}, "fid": {"status": "skipped"}, "images": {},
    }
    report.update(over)
    return report


def test_report_states_test_images_and_where_the_split_came_from():
    manifest = {"splits": {"test": {"count": 50}, "train": {"count": 500}},
                "source": {"split": "folders", "splits": "folders train/ and test/"}}
    split = split_info(manifest)
    assert split == {"count": 50, "how": "folders train/ and test/"}
    md = render_markdown(_report(test_split=split))
    assert "40 test images (of 50 in the test split; split: folders train/ and test/)" in md
    assert "40 test images (of 50 in the test split)," in render_markdown(
        _report(test_split=split_info({"splits": {"test": {"count": 50}}, "source": {}})))
    assert "40 test images," in render_markdown(_report())  # an older report.json: no split recorded


def _metrics_rows(log_gamma_at, steps: int = 200, every: int = 10, lr: float = 1e-3) -> list[dict[str, Any]]:
    """metrics.jsonl rows as the training loop writes them: each row's γ the mean over its window's steps."""
    rows = []
    for end in range(every, steps + 1, every):
        gamma = float(np.mean([np.exp(log_gamma_at(t)) for t in range(end - every + 1, end + 1)]))
        rows.append({"step": end, "loss": 1.0 / end, "gamma": gamma, "lr": lr, "samples": end * 64})
    return rows


def _write_metrics(run_dir: Path, stage: str, rows: list[dict[str, Any]]) -> RunLayout:
    layout = RunLayout(str(run_dir))
    (run_dir / stage).mkdir(parents=True, exist_ok=True)
    Path(layout.metrics(stage)).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return layout


def test_not_converged_when_log_gamma_falls_at_adams_step_size(tmp_path):
    layout = _write_metrics(tmp_path, "stage1", _metrics_rows(lambda t: -1e-3 * t))  # Adam's pace: lr per step
    rows = read_metrics(layout, "stage1")
    assert len(rows) == 20
    result = gamma_convergence(rows, "learned")
    assert result["converged"] is False and result["adam_step"] == pytest.approx(1e-3)
    assert result["log_gamma_per_step"] == pytest.approx(-1e-3, rel=1e-3)
    assert result["warning"].startswith("not converged: γ_x still falling at Adam's step size")
    assert "train longer or use stage1.gamma=optimal" in result["warning"]
    md = render_markdown(_report(stage1_convergence=result))
    assert "**Warning: not converged: γ_x still falling at Adam's step size" in md


def test_no_warning_when_gamma_has_levelled_off_or_is_optimal_or_has_its_own_rate(tmp_path):
    levelled = _metrics_rows(lambda t: -2.0 * (1 - np.exp(-t / 20)))  # converged: flat at the end
    result = gamma_convergence(levelled, "learned")
    assert result["converged"] is True and result["warning"] is None
    assert "Warning" not in render_markdown(_report(stage1_convergence=result))
    falling = _metrics_rows(lambda t: -1e-3 * t)
    assert gamma_convergence(falling, "optimal")["warning"] is None  # a closed form has no step size
    # With gamma_lr ten times lr, log γ's step is 1e-2: falling at 1e-3 per step is not its maximum rate.
    assert gamma_convergence(falling, "learned", lr_scale=10.0)["converged"] is True
    # Slower than the step size but above the threshold's share still counts as falling at it.
    assert gamma_convergence(_metrics_rows(lambda t: -0.9e-3 * t), "learned")["converged"] is False
    assert gamma_convergence(_metrics_rows(lambda t: -0.5e-3 * t), "learned")["converged"] is True
    assert gamma_convergence(falling[:1], "learned")["converged"] is None  # one window: no rate
    assert read_metrics(RunLayout(str(tmp_path / "none")), "stage1") == []


def test_stage2_curves_and_the_prior_verdict_in_the_report(tmp_path):
    layout = _write_metrics(tmp_path, "stage2", _metrics_rows(lambda t: -0.01 * t, steps=300))
    rows = read_metrics(layout, "stage2")
    curves = {"loss": curve(rows, "loss"), "gamma": curve(rows, "gamma")}
    assert curves["loss"][0] == [640, 0.1] and len(curves["gamma"]) == 30
    md = render_markdown(_report(stage2_curves=curves))
    table = md.split("## Stage 2 training")[1].split("## FID")[0]
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(body) == 8 and body[0].startswith("| 640 | 0.1 |") and body[-1].startswith("| 19200 |")
    assert "## Stage 2 training" not in render_markdown(_report())

    closer = prior_verdict({"z": 0.24, "u": 0.12})
    assert closer == "stage 2 brings the latents closer to N(0,I): q(u) 0.12 < q(z) 0.24"
    assert f"Verdict: {closer}." in render_markdown(_report())
    farther = prior_verdict({"z": 1.27, "u": 1.49})
    assert farther == "stage 2 does not bring the latents closer to N(0,I): q(u) 1.49 >= q(z) 1.27"
    assert prior_verdict({"z": None, "u": 0.1}) is None

    png = plot_png({"stage1": [[0, 1.0], [64, 0.5]]}, [0.01, 0.5], 0.05, stage2_loss=curves["loss"])
    assert png.startswith(b"\x89PNG") and len(png) > len(plot_png({}, [0.01, 0.5], 0.05))


def test_deviations_from_the_paper_protocol_are_listed():
    from tsvae_dist.config import TrainConfig
    from tsvae_dist.report import protocol_deviations

    paper = {"stage1": TrainConfig(), "stage2": TrainConfig(epochs=800, batch_gpu=16)}  # accumulation: same update
    assert protocol_deviations(paper) == []
    assert "Deviations" not in render_markdown(_report(protocol_deviations=[]))
    ours = protocol_deviations({"stage1": TrainConfig(batch_size=512, lr_scaling="sqrt", warmup_steps=500),
                                "stage2": TrainConfig()})
    assert ours == ["stage1.batch_size=512 (paper: 64)", "stage1.lr_scaling=sqrt (paper: none)",
                    "stage1.warmup_steps=500 (paper: 0)"]
    md = render_markdown(_report(protocol_deviations=ours))
    assert ("Deviations from the paper's protocol: stage1.batch_size=512 (paper: 64), "
            "stage1.lr_scaling=sqrt (paper: none), stage1.warmup_steps=500 (paper: 0).") in md


def test_stage2_error_share_in_inactive_dims_from_constructed_latents() -> None:
    """z and ẑ built so that dims 0-1 (active: σ² 0.01) carry squared errors 1 and 4 per sample and dims
    2-3 (inactive: σ² 0.9, 1.0) carry 9 and 36: the inactive share is 45/50."""
    import torch

    g = torch.Generator().manual_seed(0)
    z = torch.randn(100, 4, generator=g, dtype=torch.float64)
    offsets = torch.tensor([1.0, -2.0, 3.0, 6.0], dtype=torch.float64)
    signs = torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0).to(torch.float64)[:, None]
    z_hat = z + signs * offsets
    per_dim = ((z - z_hat) ** 2).mean(0).tolist()
    out = stage2_inactive_error(per_dim, [0.01, 0.01, 0.9, 1.0], threshold=0.05)
    assert out["share"] == pytest.approx(45 / 50) and out["inactive"] == pytest.approx(45)
    assert out["total"] == pytest.approx(50)
    # The threshold decides: at 0.95 only dim 3 is inactive; at exactly a dim's σ² that dim is inactive.
    assert stage2_inactive_error(per_dim, [0.01, 0.01, 0.9, 1.0], 0.95)["share"] == pytest.approx(36 / 50)
    assert stage2_inactive_error(per_dim, [0.01, 0.01, 0.9, 1.0], 0.9)["share"] == pytest.approx(45 / 50)
    assert stage2_inactive_error([0.0, 0.0], [1.0, 1.0], 0.05)["share"] is None


def test_markdown_has_the_stage2_error_share_row() -> None:
    report = _report(stage2_error={"share": 0.9, "inactive": 45.0, "total": 50.0, "per_dim": [1, 4, 9, 36]})
    assert "| share of stage-2 error E[(z − ẑ)²] in inactive dims | 90.0% of 50 |" in render_markdown(report)
    assert "stage-2 error" not in render_markdown(_report())  # a report from before the field: no row
