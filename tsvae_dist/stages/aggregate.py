"""The aggregate job (`seeds` > 1): mean ± std over the seeds' reports, in the paper's Table 1 layout.

The paper reports every FID as the mean ± std of 10 runs. With `seeds=N` the launcher runs N pipelines,
`<run_dir>/seed-<k>/` with seed `cfg.seed + k`; this job reads each seed's `evaluate/report.json`
(their paths from `RunLayout`), writes `<run_dir>/aggregate/report.json` and `report.md`, then its
record: like every stage it is skipped when done and redone when its record is missing. The std is
the sample standard deviation (n − 1 in the denominator); a value a seed did not report (FID not
computed, no γ_x with a cross-entropy decoder) is left out of its mean, and `n` says how many had it.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from tsvae_dist import records, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import DataError
from tsvae_dist.layout import AGGREGATE, RunLayout
from tsvae_dist.report import PAPER_TABLE1

log = logging.getLogger(__name__)
STAGE = AGGREGATE

# What is aggregated: name -> (label, path into a report.json).
FIDS = {
    "fid_reconstructions": ("reconstructions", ("fid", "reconstructions")),
    "fid_stage1_samples": ("stage-1 samples (VAE)", ("fid", "stage1_samples")),
    "fid_stage2_samples": ("stage-2 samples (2-Stage VAE)", ("fid", "stage2_samples")),
}
DIAGNOSTICS = {
    "reconstruction_mse": ("reconstruction MSE per pixel", ("reconstruction_mse",)),
    "gamma_x": ("γ_x (stage-1 decoder std)", ("gamma_x",)),
    "gamma_z": ("γ_z (stage-2 decoder std)", ("gamma_z",)),
    "active_dims": ("active latent dims", ("active_dims", "count")),
    "frechet_z": ("Fréchet distance q(z) to N(0, I)", ("frechet_to_prior", "z")),
    "frechet_u": ("Fréchet distance q(u) to N(0, I)", ("frechet_to_prior", "u")),
}


def seed_layouts(cfg: RunConfig) -> list[RunLayout]:
    """The run layout of each seed, k = 0 .. seeds-1."""
    return [RunLayout(cfg.layout.seed_dir(k)) for k in range(cfg.seeds)]


def _lookup(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = report
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """{mean, std, n, values} over the values present; std is the sample std (None below 2 values)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    n = len(present)
    mean = sum(present) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n >= 2 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def aggregate(reports: list[dict[str, Any]], seeds: list[int], run_dir: str) -> dict[str, Any]:
    """The aggregate report's content from the seeds' report.json contents (in seed order)."""
    first = reports[0]
    metrics = {name: mean_std([_lookup(r, path) for r in reports])
               for name, (_, path) in {**FIDS, **DIAGNOSTICS}.items()}
    return {
        "dataset": first.get("dataset"),
        "run_dir": run_dir,
        "seeds": seeds,
        "runs": [r.get("run_dir") for r in reports],
        "fid_status": [r.get("fid", {}).get("status") for r in reports],
        "latent_dim": first.get("active_dims", {}).get("latent_dim"),
        "true_dim": first.get("active_dims", {}).get("true_dim"),
        "metrics": metrics,
        "paper_table1": first.get("paper_table1") or PAPER_TABLE1.get(first.get("dataset")),
        "paper_table2": first.get("paper_table2"),
    }


def _pm(m: dict[str, Any]) -> str:
    if m["mean"] is None:
        return "n/a"
    text = f"{m['mean']:.4g}" + (f" ± {m['std']:.2g}" if m["std"] is not None else "")
    return text + (f" (of {m['n']})" if m["n"] < len(m["values"]) else "")


def render_markdown(agg: dict[str, Any]) -> str:
    """report.md of the aggregate: Table 1's layout (our mean ± std beside the paper's), then diagnostics."""
    m, n = agg["metrics"], len(agg["seeds"])
    lines = [
        f"# Two-Stage VAE over {n} seeds: {agg['dataset']}",
        "",
        f"Run: `{agg['run_dir']}`, seeds {', '.join(str(s) for s in agg['seeds'])} (one run each under "
        "`seed-<k>/`); mean ± sample std over the seeds.",
        "",
        "## FID (the paper's Table 1 layout)",
        "",
        "| | VAE (learned γ): stage-1 samples | 2-Stage VAE: stage-2 samples | reconstructions |",
        "|---|---|---|---|",
        f"| ours, {n} seeds | {_pm(m['fid_stage1_samples'])} | {_pm(m['fid_stage2_samples'])} | "
        f"{_pm(m['fid_reconstructions'])} |",
    ]
    paper = agg.get("paper_table1")
    if paper:
        lines.append(f"| paper, Table 1 (InfoGAN nets, 10 runs' mean) | {paper['vae']} | {paper['two_stage_vae']} | |")
    wae = agg.get("paper_table2")
    if wae:
        lines.append(f"| paper, Table 2 (WAE nets) | {wae['vae']} | {wae['two_stage_vae']} | |")
    statuses = sorted({s for s in agg["fid_status"] if s})
    lines += ["", f"FID status per seed: {', '.join(str(s) for s in agg['fid_status'])}"
              + ("" if statuses == ["computed"] else " (FID needs eval.inception_weights)"), "",
              "## Diagnostics", "", "| diagnostic | mean ± std | per seed |", "|---|---|---|"]
    for name, (label, _) in DIAGNOSTICS.items():
        if name == "active_dims" and agg.get("latent_dim") is not None:
            label += f" (of {agg['latent_dim']}" + (f", true {agg['true_dim']})" if agg.get("true_dim") else ")")
        per_seed = ", ".join("n/a" if v is None else f"{v:.4g}" for v in m[name]["values"])
        lines.append(f"| {label} | {_pm(m[name])} | {per_seed} |")
    z, u = m["frechet_z"]["mean"], m["frechet_u"]["mean"]
    if z is not None and u is not None:
        closer = "brings" if u < z else "does not bring"
        lines += ["", f"Verdict (means): stage 2 {closer} the latents closer to N(0,I): q(u) {u:.3g} "
                      f"{'<' if u < z else '>='} q(z) {z:.3g}."]
    return "\n".join(lines) + "\n"


def run(cfg: RunConfig) -> str:
    """Aggregate the seeds' reports into `<run_dir>/aggregate/`; returns the URL of its report.json."""
    layouts = seed_layouts(cfg)
    missing = [lay.run_dir for lay in layouts if not lay.is_done("evaluate")]
    if missing:
        raise DataError(f"{STAGE}: {len(missing)} of {cfg.seeds} seeds have no evaluate report yet "
                        f"(e.g. {missing[0]}); run the pipeline of every seed first")
    reports = [json.loads(storage.read_text(lay.report)) for lay in layouts]
    agg = aggregate(reports, [cfg.seed + k for k in range(cfg.seeds)], cfg.run_dir)
    url = cfg.layout.aggregate_report
    storage.write_text_atomic(url, json.dumps(agg, indent=2) + "\n")
    storage.write_text_atomic(cfg.layout.aggregate_report_markdown, render_markdown(agg))
    records.write(cfg, STAGE, consumed={f"seed-{k}": records.artifact(lay.report) for k, lay in enumerate(layouts)},
                  produced={"report": records.artifact(url)})
    log.info("%s: %d seeds -> %s", STAGE, cfg.seeds, url)
    return url
