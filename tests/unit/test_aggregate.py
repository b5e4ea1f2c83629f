"""The aggregate job over fake seed reports: mean ± sample std, the Table 1 layout, the seeds' plan."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tsvae_dist.cli import compose
from tsvae_dist.errors import ConfigError, DataError
from tsvae_dist.layout import AGGREGATE, RunLayout, stage_module
from tsvae_dist.stages import aggregate

REPO = Path(__file__).resolve().parents[2]


def _report(run_dir: str, fid2: float | None, gamma_x: float, active: int, z: float, u: float) -> dict[str, Any]:
    fid = ({"status": "computed", "reconstructions": 50.0, "stage1_samples": 110.0, "stage2_samples": fid2}
           if fid2 is not None else {"status": "skipped (no eval.inception_weights)"})
    return {"dataset": "mnist", "run_dir": run_dir, "reconstruction_mse": 0.01, "gamma_x": gamma_x, "gamma_z": 0.9,
            "active_dims": {"count": active, "latent_dim": 16, "true_dim": None},
            "frechet_to_prior": {"z": z, "u": u}, "fid": fid, "paper_table1": {"vae": 54.5, "two_stage_vae": 12.6}}


def test_mean_and_sample_std_over_seeds_in_the_table1_layout():
    reports = [_report("r/seed-0", 100.0, 0.1, 4, 1.0, 0.5), _report("r/seed-1", 110.0, 0.3, 6, 2.0, 0.7),
               _report("r/seed-2", None, 0.2, 5, 3.0, 0.9)]
    agg = aggregate.aggregate(reports, [7, 8, 9], "r")
    m = agg["metrics"]
    assert m["gamma_x"]["mean"] == pytest.approx(0.2) and m["gamma_x"]["std"] == pytest.approx(0.1)  # n - 1
    assert m["active_dims"]["mean"] == 5 and m["active_dims"]["std"] == pytest.approx(1.0)
    assert m["frechet_z"]["values"] == [1.0, 2.0, 3.0] and m["frechet_u"]["mean"] == pytest.approx(0.7)
    # FID missing in one seed: left out of the mean, and the table says of how many.
    assert m["fid_stage2_samples"] == {"mean": 105.0, "std": pytest.approx(math.sqrt(50)), "n": 2,
                                       "values": [100.0, 110.0, None]}
    assert m["gamma_z"]["std"] == 0.0 and agg["seeds"] == [7, 8, 9]
    md = aggregate.render_markdown(agg)
    assert "| ours, 3 seeds | 110 ± 0 (of 2) | 105 ± 7.1 (of 2) | 50 ± 0 (of 2) |" in md
    assert "| paper, Table 1 (InfoGAN nets, 10 runs' mean) | 54.5 | 12.6 | |" in md
    assert "| γ_x (stage-1 decoder std) | 0.2 ± 0.1 | 0.1, 0.3, 0.2 |" in md
    assert "| active latent dims (of 16) | 5 ± 1 | 4, 6, 5 |" in md
    assert "stage 2 brings the latents closer to N(0,I): q(u) 0.7 < q(z) 2." in md


def test_one_value_has_no_std_and_none_has_no_mean():
    assert aggregate.mean_std([3.0]) == {"mean": 3.0, "std": None, "n": 1, "values": [3.0]}
    assert aggregate.mean_std([None, None])["mean"] is None
    assert aggregate._pm(aggregate.mean_std([None])) == "n/a"


def test_aggregate_run_needs_every_seed_then_writes_its_record(tmp_path):
    cfg = compose([f"run_dir={tmp_path / 'run'}", "seeds=2", "seed=3"])
    layouts = aggregate.seed_layouts(cfg)
    assert [lay.run_dir for lay in layouts] == [str(tmp_path / "run" / f"seed-{k}") for k in range(2)]
    assert cfg.for_seed(1).run_dir == layouts[1].run_dir and cfg.for_seed(1).seed == 4
    assert cfg.for_seed(1).seeds == 1
    for k, lay in enumerate(layouts):
        Path(lay.stage_dir("evaluate")).mkdir(parents=True)
        Path(lay.report).write_text(json.dumps(_report(lay.run_dir, 100.0 + 10 * k, 0.1 * (k + 1), 4, 1.0, 2.0)))
        if k == 0:
            Path(lay.record("evaluate")).write_text("{}")
    with pytest.raises(DataError, match="1 of 2 seeds have no evaluate report yet"):
        aggregate.run(cfg)
    Path(layouts[1].record("evaluate")).write_text("{}")
    url = aggregate.run(cfg)
    assert url == RunLayout(cfg.run_dir).aggregate_report and cfg.layout.is_done(AGGREGATE)
    agg = json.loads(Path(url).read_text())
    assert agg["seeds"] == [3, 4] and agg["metrics"]["fid_stage2_samples"]["mean"] == 105.0
    assert "does not bring the latents closer" in Path(cfg.layout.aggregate_report_markdown).read_text()
    record = json.loads(Path(cfg.layout.record(AGGREGATE)).read_text())
    assert set(record["consumed"]) == {"seed-0", "seed-1"}
    assert stage_module(AGGREGATE) == "tsvae_dist.stages.aggregate"


def test_seeds_is_validated():
    with pytest.raises(ConfigError, match="seeds: must be an integer >= 1, got 0"):
        compose(["seeds=0"])


@pytest.mark.integration  # starts a process
def test_dry_run_lists_every_seeds_stages_and_the_aggregate(tmp_path):
    proc = subprocess.run([sys.executable, "launch/submit.py", f"run_dir={tmp_path / 'run'}", "seeds=2", "seed=5",
                           "action=dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "seed-0 (seed 5)" in out and "seed-1 (seed 6)" in out and str(tmp_path / "run" / "seed-1") in out
    assert out.count("stage1") == 2 and out.count("evaluate") >= 2
    assert "aggregate" in out and "after the 2 seeds' evaluate" in out
    assert out.strip().splitlines()[-1] == f"report: {tmp_path / 'run' / 'aggregate' / 'report.json'}"
    assert not (tmp_path / "run").exists()
