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


def read_metrics(layout: RunLayout, stage: str) -> list[dict[str, Any]]:
    """The rows of a training stage's metrics.jsonl (one per log window), or [] when it has none."""
    url = layout.metrics(stage)
    if not storage.exists(url):
        return []
    return [json.loads(ln) for ln in storage.read_text(url).splitlines() if ln.strip()]


def curve(rows: list[dict[str, Any]], key: str) -> list[list[float]]:
    """(samples seen, `key`) pairs of the rows that have it."""
    return [[r.get("samples", r["step"]), r[key]] for r in rows if key in r]


def training_curves(layout: RunLayout) -> dict[str, list[list[float]]]:
    """(samples seen, γ) pairs of each training stage, from its metrics log."""
    return {stage: curve(rows, "gamma") for stage in TRAINING_STAGES if (rows := read_metrics(layout, stage))}


# A learned log γ whose last window falls by at least this share of Adam's step (lr per step) has not converged.
FALLING_AT_STEP_SIZE = 0.8


def gamma_convergence(rows: list[dict[str, Any]], mode: str, lr_scale: float = 1.0) -> dict[str, Any]:
    """Whether a learned γ was still falling at the optimiser's maximum rate when training ended.

    With Adam a parameter whose gradient keeps its sign moves by about its learning rate per step, so a
    log γ that falls by ≈ lr per step over the last metrics window is set by the step size, not by the
    data. Each row's γ is its window's mean; for a log γ falling linearly the mean sits at the window's
    centre, so the rate is the change of log γ between the last two windows over their centres' distance.
    `lr_scale` is log γ's learning rate over the row's `lr` (its own `gamma_lr`). Optimal γ is the batch's
    closed form and has no step size: it is never flagged.
    """
    out: dict[str, Any] = {"mode": mode, "log_gamma_per_step": None, "adam_step": None, "converged": None,
                           "warning": None}
    points = [r for r in rows if "gamma" in r and r.get("gamma", 0) > 0]
    if mode != "learned" or len(points) < 2:
        return out
    prev, last = points[-2], points[-1]
    prev_start = points[-3]["step"] if len(points) > 2 else 0
    centre_prev, centre_last = (prev_start + prev["step"]) / 2, (prev["step"] + last["step"]) / 2
    if centre_last <= centre_prev:
        return out
    rate = (np.log(last["gamma"]) - np.log(prev["gamma"])) / (centre_last - centre_prev)
    step = float(last.get("lr", 0.0)) * lr_scale
    out.update(log_gamma_per_step=float(rate), adam_step=step or None)
    if step > 0:
        out["converged"] = bool(-rate < FALLING_AT_STEP_SIZE * step)
        if not out["converged"]:
            out["warning"] = (f"not converged: γ_x still falling at Adam's step size (log γ_x {rate:.3g} per step, "
                              f"lr {step:.3g}); train longer or use stage1.gamma=optimal")
    return out


def prior_verdict(frechet: dict[str, float | None]) -> str | None:
    """One line: does stage 2 bring the latents closer to N(0, I) (q(u) vs q(z), Fréchet distance)?"""
    z, u = frechet.get("z"), frechet.get("u")
    if z is None or u is None:
        return None
    if u < z:
        return f"stage 2 brings the latents closer to N(0,I): q(u) {u:.3g} < q(z) {z:.3g}"
    return f"stage 2 does not bring the latents closer to N(0,I): q(u) {u:.3g} >= q(z) {z:.3g}"


def plot_png(curves: dict[str, list[list[float]]], posterior_var: list[float], threshold: float,
             stage2_loss: list[list[float]] | None = None) -> bytes:
    """One PNG: γ_x and γ_z over training (log scale), the mean posterior variance per latent dimension, and
    (given its points) stage 2's loss over training."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; set before pyplot is imported
    import matplotlib.pyplot as plt

    panels = 3 if stage2_loss else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_gamma, ax_var = axes[0], axes[1]
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
    if stage2_loss:
        xs, ys = zip(*stage2_loss, strict=True)
        axes[2].plot(xs, ys, color="tab:green")
        axes[2].set(xlabel="training samples seen", ylabel="loss", title="stage 2 loss over training")
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


def _thinned(points: list[list[float]], n: int) -> list[list[float]]:
    """At most `n` of `points`, evenly spread, the first and the last always among them."""
    if len(points) <= n:
        return points
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


def _stage2_curve_lines(curves: dict[str, list[list[float]]]) -> list[str]:
    """Stage 2's training curves as a short table (loss and γ_z at up to 8 points over the samples seen)."""
    loss, gamma = curves.get("loss") or [], dict((x, y) for x, y in curves.get("gamma") or [])
    if not loss:
        return []
    lines = ["## Stage 2 training", "", "| samples seen | loss | γ_z |", "|---|---|---|"]
    for x, y in _thinned(loss, 8):
        lines.append(f"| {_fmt(x)} | {_fmt(float(y))} | {_fmt(gamma.get(x))} |")
    return [*lines, ""]


PAPER_PROTOCOL = {"batch_size": 64, "lr": 1e-4, "lr_scaling": "none", "warmup_steps": 0}  # both stages


def protocol_deviations(stages: dict[str, Any]) -> list[str]:
    """The training settings that differ from the paper's protocol, one "stage.key=value (paper: v)" each.

    `stages`: stage name -> its TrainConfig. Gradient accumulation (`batch_gpu`) is not one: the update
    is the global batch's either way."""
    return [f"{stage}.{key}={getattr(cfg, key)} (paper: {paper})"
            for stage, cfg in stages.items() for key, paper in PAPER_PROTOCOL.items()
            if getattr(cfg, key) != paper]


def stage2_inactive_error(sq_err_per_dim: list[float], posterior_var: list[float],
                          threshold: float) -> dict[str, Any]:
    """How much of stage 2's reconstruction error E[(z − ẑ)²] sits in z's inactive dimensions.

    Inactive as the active-dims count has it (mean posterior σ² ≥ `threshold`): those dims of q(z) are
    noise the stage-1 decoder ignores, so a stage 2 spending its error there still reproduces the
    manifold; a large share in the active dims is what would hurt samples. `share` is None when the
    total error is zero.
    """
    assert len(sq_err_per_dim) == len(posterior_var), "one error and one variance per latent dimension"
    total = float(sum(sq_err_per_dim))
    inactive = float(sum(e for e, v in zip(sq_err_per_dim, posterior_var, strict=True) if v >= threshold))
    return {"share": inactive / total if total > 0 else None, "inactive": inactive, "total": total,
            "per_dim": [float(e) for e in sq_err_per_dim]}


def _stage2_error_line(report: dict[str, Any]) -> list[str]:
    """The diagnostics-table row of stage 2's error in inactive dims (absent from older reports)."""
    e = report.get("stage2_error")
    if not e:
        return []
    share = "n/a" if e["share"] is None else f"{100 * e['share']:.1f}%"
    return [f"| share of stage-2 error E[(z − ẑ)²] in inactive dims | {share} of {_fmt(e['total'])} |"]


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
        *_stage2_error_line(report),
        "",
    ]
    deviations = report.get("protocol_deviations") or []
    if deviations:  # so a result is not read as the paper's recipe when it is not
        lines += [f"Deviations from the paper's protocol: {', '.join(deviations)}.", ""]
    verdict = prior_verdict(report["frechet_to_prior"])
    if verdict:
        lines += [f"Verdict: {verdict}.", ""]
    warning = (report.get("stage1_convergence") or {}).get("warning")
    if warning:
        lines += [f"**Warning: {warning}.**", ""]
    lines += _stage2_curve_lines(report.get("stage2_curves") or {})
    lines += ["## FID", ""]
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
