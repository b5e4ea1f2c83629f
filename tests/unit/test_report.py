"""report.py over fake report content and fake metrics logs: the test split line, the convergence warning,
the stage-2 curves and the q(u) vs q(z) verdict."""

from __future__ import annotations

from typing import Any

from tsvae_dist.report import render_markdown, split_info


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
