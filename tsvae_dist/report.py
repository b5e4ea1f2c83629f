"""What the evaluate stage presents: the paper's tables beside our numbers, the diagnostics plot, report.md.

Pure presentation over the numbers the evaluate stage reduced (report.json's content), plus the
training curves read from each training stage's metrics log.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from tsvae_dist import storage
from tsvae_dist.layout import TRAINING_STAGES, RunLayout

# The paper's Table 1 (FID, neutral architecture): VAE (learned γ), VAE (cross-entropy), best GAN, 2-Stage VAE.
PAPER_TABLE1 = {
    "mnist": {"vae": 54.5, "vae_cross_entropy": 16.6, "best_gan": 10, "two_stage_vae": 12.6},
    "fashion": {"vae": 60.0, "vae_cross_entropy": 43.6, "best_gan": 32, "two_stage_vae": 29.3},
    "cifar10": {"vae": 76.7, "vae_cross_entropy": 106.0, "best_gan": 70, "two_stage_vae": 72.9},
    "celeba64": {"vae": 60.5, "vae_cross_entropy": 53.3, "best_gan": 49, "two_stage_vae": 44.4},
}
# The paper's Table 2 (FID, CelebA 64 with the WAE networks): the comparison for model.family=wae.
PAPER_TABLE2 = {"celeba64": {"vae": 63, "wae_mmd": 55, "wae_gan": 42, "two_stage_vae": 34}}


def training_curves(layout: RunLayout) -> dict[str, list[list[float]]]:
    """(samples seen, γ) pairs of each training stage, from its metrics log."""
    curves = {}
    for stage in TRAINING_STAGES:
        url = layout.metrics(stage)
        if storage.exists(url):
            rows = [json.loads(ln) for ln in storage.read_text(url).splitlines() if ln.strip()]
            curves[stage] = [[r.get("samples", r["step"]), r["gamma"]] for r in rows if "gamma" in r]
    return curves


def plot_png(curves: dict[str, list[list[float]]], posterior_var: list[float], threshold: float) -> bytes:
    """One PNG: γ_x and γ_z over training (log scale), and the mean posterior variance per latent dimension."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, (ax_gamma, ax_var) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, label in (("stage1", "γ_x (stage 1)"), ("stage2", "γ_z (stage 2)")):
        points = curves.get(stage) or []
        if points:
            xs, ys = zip(*points, strict=True)
            ax_gamma.plot(xs, ys, label=label)
    ax_gamma.set(xscale="linear", yscale="log", xlabel="training samples seen", ylabel="γ",
                 title="decoder standard deviations over training")
    if ax_gamma.lines:
        ax_gamma.legend()
    order = np.argsort(posterior_var)
    values = np.asarray(posterior_var)[order]
    ax_var.bar(range(len(values)), values, color=["tab:blue" if v < threshold else "tab:gray" for v in values])
    ax_var.axhline(threshold, color="tab:red", linestyle="--", label=f"active if < {threshold}")
    ax_var.set(yscale="log", xlabel="latent dimension (sorted)", ylabel="mean posterior variance σ²",
               title=f"active dimensions: {int((values < threshold).sum())} of {len(values)}")
    ax_var.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def split_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """How many images the dataset's test split holds and where the split came from (its builder's record:
    e.g. the folder builder's `folders train/ and test/` or its hash rule), for report.json."""
    source = manifest.get("source") or {}
    how = source.get("splits")
    return {"count": int(manifest["splits"]["test"]["count"]), "how": how if isinstance(how, str) else None}


def _test_images_line(report: dict[str, Any]) -> str:
    split = report.get("test_split") or {}
    parts = []
    if split.get("count") is not None:
        parts.append(f"of {split['count']} in the test split")
    if split.get("how"):
        parts.append(f"split: {split['how']}")
    return f"{report['test_images']} test images" + (f" ({'; '.join(parts)})" if parts else "")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable report.md from report.json's content."""
    a, fid = report["active_dims"], report["fid"]
    lines = [
        f"# Two-Stage VAE report: {report['dataset']}",
        "",
        f"Run: `{report['run_dir']}`, {_test_images_line(report)}, "
        + (f"{report['samples']} samples per FID set." if fid["status"] == "computed"
           else f"no FID sets (FID {fid['status']})."),
        "",
        "| diagnostic | value |",
        "|---|---|",
        f"| reconstruction MSE per pixel | {_fmt(report['reconstruction_mse'])} |",
        f"| γ_x (stage-1 decoder std) | {_fmt(report['gamma_x'])} |",
        f"| γ_z (stage-2 decoder std) | {_fmt(report['gamma_z'])} |",
        f"| active latent dims (mean σ² < {a['threshold']}) | {a['count']} of {a['latent_dim']}"
        + (f" (true dimension {a['true_dim']})" if a["true_dim"] is not None else "") + " |",
        f"| Fréchet distance q(z) to N(0, I) | {_fmt(report['frechet_to_prior']['z'])} |",
        f"| Fréchet distance q(u) to N(0, I) | {_fmt(report['frechet_to_prior']['u'])} |",
        "",
        "## FID",
        "",
    ]
    if any(k in fid for k in ("reconstructions", "stage1_samples", "stage2_samples")):
        lines += ["| | reconstructions | stage-1 samples | stage-2 samples |", "|---|---|---|---|",
                  f"| ours | {_fmt(fid.get('reconstructions'))} | {_fmt(fid.get('stage1_samples'))} | "
                  f"{_fmt(fid.get('stage2_samples'))} |"]
        paper = report.get("paper_table1")
        if paper:
            lines.append(f"| paper, Table 1 (InfoGAN nets, 10 runs' mean) | | VAE (learned γ) {paper['vae']} | "
                         f"2-Stage VAE {paper['two_stage_vae']} |")
        wae = report.get("paper_table2")
        if wae:
            lines.append(f"| paper, Table 2 (WAE nets) | | VAE {wae['vae']} | 2-Stage VAE {wae['two_stage_vae']} |")
    lines += ["", f"FID status: {fid['status']}"]
    if "reference" in fid:
        ref = fid["reference"]
        lines.append(f"Reference statistics: `{ref['url']}` ({'cached' if ref['cached'] else 'computed here'})")
    lines.append("")
    for name, file in report["images"].items():
        lines += [f"## {name.replace('_', ' ')}", "", f"![{name}]({file})", ""]
    return "\n".join(lines)
