"""Evaluate: the paper's diagnostics and FID across all ranks, written as report.json and report.md.

Every statistic is a sum reduced over ranks (float64 feature sums and outer products, exact
counts), never a gather of features. Generated samples are keyed by index, so the set is the same
for any world size.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from tsvae_dist import dist, manifest, precision, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.datasets import ensure_dataset_once
from tsvae_dist.encode import load_model
from tsvae_dist.fid import FeatureStats, frechet_distance
from tsvae_dist.fid_eval import FIDEvaluator
from tsvae_dist.loader import iter_split_shards
from tsvae_dist.noise import keyed_normal
from tsvae_dist.sampling import grid, png_bytes, sample_images

STAGE = "evaluate"
# The paper's Table 1 (FID, neutral architecture): VAE (learned γ), VAE (cross-entropy), best GAN, 2-Stage VAE.
PAPER_TABLE1 = {
    "mnist": {"vae": 54.5, "vae_cross_entropy": 16.6, "best_gan": 10, "two_stage_vae": 12.6},
    "fashion": {"vae": 60.0, "vae_cross_entropy": 43.6, "best_gan": 32, "two_stage_vae": 29.3},
    "cifar10": {"vae": 76.7, "vae_cross_entropy": 106.0, "best_gan": 70, "two_stage_vae": 72.9},
    "celeba64": {"vae": 60.5, "vae_cross_entropy": 53.3, "best_gan": 49, "two_stage_vae": 44.4},
}


def report_url(cfg: RunConfig) -> str:
    return storage.join(manifest.stage_dir(cfg, STAGE), "report.json")


def _prior_distance(stats: FeatureStats) -> float:
    """Fréchet distance between the Gaussian fit of the aggregated posterior and N(0, I)."""
    mu, cov = stats.mean_cov()
    return float(frechet_distance(mu, cov, np.zeros_like(mu), np.eye(len(mu))))


@torch.no_grad()
def _test_pass(cfg: RunConfig, info: dist.DistInfo, data: dict[str, Any], stage1: torch.nn.Module,
               stage2: torch.nn.Module, fid: FIDEvaluator | None) -> dict[str, Any]:
    """One pass over the first eval.num_test test images: reconstruction, posterior and FID sums."""
    kappa, device = cfg.model.latent_dim, info.device
    offsets, total = {}, 0
    for entry in data["splits"]["test"]["shards"]:
        offsets[entry["name"]] = total
        total += entry["count"]
    n_test = min(cfg.eval.num_test, total)
    sq_err = torch.zeros((), dtype=torch.float64)
    pixels = torch.zeros((), dtype=torch.float64)
    var_sum = torch.zeros(kappa, dtype=torch.float64)
    z_stats, u_stats = FeatureStats(kappa), FeatureStats(kappa)
    grid_pairs: list[torch.Tensor] = []
    for shard_name, samples in iter_split_shards(cfg.dataset_root, "test", info.rank, info.world_size):
        keep = [(k, s) for j, (k, s) in enumerate(samples) if offsets[shard_name] + j < n_test]
        for start in range(0, len(keep), cfg.eval.batch_size):
            part = keep[start:start + cfg.eval.batch_size]
            keys = [k for k, _ in part]
            x = torch.stack([s["image"] for _, s in part]).to(device)
            with precision.autocast(cfg.stage1.precision, device):
                mu, log_sigma = stage1.encode(x)
                recon = stage1.decode(mu)
            mu, log_sigma, recon = mu.float(), log_sigma.float(), recon.float().clamp(0, 1)
            sq_err += ((recon - x) ** 2).double().sum().cpu()
            pixels += x.numel()
            var_sum += (2 * log_sigma).exp().double().sum(0).cpu()
            z = mu + log_sigma.exp() * keyed_normal(keys, kappa, cfg.seed, "eval-z").to(device)
            z_stats.add(z.cpu())
            mu_u, log_sigma_u = stage2.encode(z)
            u = mu_u + log_sigma_u.exp() * keyed_normal(keys, kappa, cfg.seed, "eval-u").to(device)
            u_stats.add(u.float().cpu())
            if fid is not None:
                fid.add("test", x)
                fid.add("reconstructions", recon)
            if offsets[shard_name] == 0 and start == 0:  # the grid shows the split's first images
                n = cfg.eval.grid_images // 2
                grid_pairs = [x[:n].cpu(), recon[:n].cpu()]
    for t in (sq_err, pixels, var_sum):
        dist.all_reduce_sum(t)
    z_stats.all_reduce()
    u_stats.all_reduce()
    posterior_var = (var_sum / max(n_test, 1)).tolist()
    return {"n_test": n_test, "mse": float(sq_err / pixels), "posterior_var": posterior_var,
            "z_stats": z_stats, "u_stats": u_stats, "grid_pairs": grid_pairs}


@torch.no_grad()
def _generate_pass(cfg: RunConfig, info: dist.DistInfo, stage1: torch.nn.Module, stage2: torch.nn.Module,
                   fid: FIDEvaluator | None) -> dict[str, torch.Tensor]:
    """Generate samples across ranks (index i on rank i mod world); feed FID; keep the grid's images."""
    grids: dict[str, torch.Tensor] = {}
    total = cfg.eval.num_samples if fid is not None else cfg.eval.grid_images
    mine = list(range(info.rank, total, info.world_size))
    for mode in ("stage1", "stage2"):
        for start in range(0, len(mine), cfg.eval.batch_size):
            indices = mine[start:start + cfg.eval.batch_size]
            images = sample_images(mode, stage1, stage2, indices, cfg.model.latent_dim, cfg.seed, "eval", info.device)
            if fid is not None:
                fid.add(f"{mode}_samples", images.to(info.device))
        if info.is_main:  # rank 0 regenerates the grid's first images itself (cheap, identical)
            grids[mode] = sample_images(mode, stage1, stage2, range(cfg.eval.grid_images), cfg.model.latent_dim,
                                        cfg.seed, "eval", info.device)
    return grids


def _training_curves(cfg: RunConfig) -> dict[str, list[list[float]]]:
    """(step, γ) pairs per training stage from its metrics log."""
    curves = {}
    for stage in ("stage1", "stage2"):
        url = storage.join(manifest.stage_dir(cfg, stage), "metrics.jsonl")
        if storage.exists(url):
            rows = [json.loads(ln) for ln in storage.read_text(url).splitlines() if ln.strip()]
            curves[stage] = [[r["step"], r["gamma"]] for r in rows if "gamma" in r]
    return curves


def run(cfg: RunConfig) -> str:
    """Evaluate the run; returns the URL of report.json."""
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0)
    data = ensure_dataset_once(cfg, info)
    stage1 = load_model(cfg, "stage1").to(info.device)
    stage2 = load_model(cfg, "stage2").to(info.device)
    fid, fid_status = FIDEvaluator.create(cfg, data, info)

    test = _test_pass(cfg, info, data, stage1, stage2, fid)
    grids = _generate_pass(cfg, info, stage1, stage2, fid)
    fid_scores = fid.finish() if fid is not None else {}
    if not info.is_main:
        dist.barrier()
        return report_url(cfg)

    # Diagnostics (rank 0).
    out_dir = manifest.stage_dir(cfg, STAGE)
    active = [v < cfg.eval.active_var_threshold for v in test["posterior_var"]]
    gammas = {"gamma_x": math.exp(stage1.log_gamma.item()) if hasattr(stage1, "log_gamma") else None,
              "gamma_z": math.exp(stage2.log_gamma.item())}
    images = {
        "reconstructions": torch.cat(test["grid_pairs"]) if test["grid_pairs"] else None,
        "stage1_samples": grids["stage1"],
        "stage2_samples": grids["stage2"],
    }
    files = {}
    for name, batch in images.items():
        if batch is not None and len(batch):
            files[name] = f"{name}.png"
            storage.write_bytes_atomic(storage.join(out_dir, files[name]), png_bytes(grid(batch)))
    report = {
        "dataset": cfg.dataset.name,
        "run_dir": cfg.run_dir,
        "test_images": test["n_test"],
        "reconstruction_mse": test["mse"],
        **gammas,
        "active_dims": {
            "count": sum(active), "latent_dim": cfg.model.latent_dim, "threshold": cfg.eval.active_var_threshold,
            "true_dim": data.get("intrinsic_dim"), "posterior_variance": test["posterior_var"],
        },
        "frechet_to_prior": {"z": _prior_distance(test["z_stats"]), "u": _prior_distance(test["u_stats"])},
        "fid": {"status": fid_status, **fid_scores},
        "paper_table1": PAPER_TABLE1.get(cfg.dataset.name),
        "images": files,
        "training": {s: manifest.read(cfg, s).get("metrics", {}) for s in ("stage1", "stage2")},
        "gamma_curves": _training_curves(cfg),
    }
    url = report_url(cfg)
    storage.write_text_atomic(url, json.dumps(report, indent=2) + "\n")
    storage.write_text_atomic(storage.join(out_dir, "report.md"), render_markdown(report))
    manifest.write(cfg, STAGE,
                   consumed={s: manifest.artifact(storage.join(manifest.stage_dir(cfg, s), "model.pt"))
                             for s in ("stage1", "stage2")},
                   produced={"report": manifest.artifact(url)})
    dist.barrier()
    return url


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
        f"Run: `{report['run_dir']}`, {report['test_images']} test images.",
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
            lines.append(f"| paper (Table 1) | | VAE {paper['vae']} | 2-Stage VAE {paper['two_stage_vae']} |")
    lines += ["", f"FID status: {fid['status']}", ""]
    for name, file in report["images"].items():
        lines += [f"## {name.replace('_', ' ')}", "", f"![{name}]({file})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from tsvae_dist.cli import main

    main(run)
