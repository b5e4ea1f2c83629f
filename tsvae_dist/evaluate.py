"""Evaluate: the paper's diagnostics and FID across all ranks, written as report.json and report.md.

The work is a list of units: one per test shard (reconstructions, posterior statistics, the test
split's Inception features) and one per chunk of `eval.batch_size` generated samples (stage-1 and
stage-2 samples, sample i drawn from its own seed). Unit k runs on rank k mod world, so the sets
of images are the same for any world size. Every statistic is a sum reduced over ranks at the end
(float64 feature sums and outer products, exact counts), never a gather of features.

Each rank checkpoints its partial sums and the units it has finished (at most every
`eval.checkpoint_every_s`, and when stopped); a requeued evaluation loads them and does only the
rest. The ranks agree on a stop signal between rounds of units and raise `Preempted`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from tsvae_dist import dist, manifest, precision, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.datasets import ensure_dataset_once
from tsvae_dist.encode import ShardPrefetcher, decode_image_shard, load_model, unit_float
from tsvae_dist.fid import FeatureStats, frechet_distance
from tsvae_dist.fid_eval import TEST, FIDEvaluator
from tsvae_dist.noise import keyed_normal, stable_seed
from tsvae_dist.preemption import Preempted, StopFlag
from tsvae_dist.sampling import MODES, grid, png_bytes, sample_images

log = logging.getLogger(__name__)
STAGE = "evaluate"
PURPOSE = "eval"  # the noise purpose of evaluation samples (`generate` uses its own)
# The paper's Table 1 (FID, neutral architecture): VAE (learned γ), VAE (cross-entropy), best GAN, 2-Stage VAE.
PAPER_TABLE1 = {
    "mnist": {"vae": 54.5, "vae_cross_entropy": 16.6, "best_gan": 10, "two_stage_vae": 12.6},
    "fashion": {"vae": 60.0, "vae_cross_entropy": 43.6, "best_gan": 32, "two_stage_vae": 29.3},
    "cifar10": {"vae": 76.7, "vae_cross_entropy": 106.0, "best_gan": 70, "two_stage_vae": 72.9},
    "celeba64": {"vae": 60.5, "vae_cross_entropy": 53.3, "best_gan": 49, "two_stage_vae": 44.4},
}
# The paper's Table 2 (FID, CelebA 64 with the WAE networks): the comparison for model.family=wae.
PAPER_TABLE2 = {"celeba64": {"vae": 63, "wae_mmd": 55, "wae_gan": 42, "two_stage_vae": 34}}


def report_url(cfg: RunConfig) -> str:
    return storage.join(manifest.stage_dir(cfg, STAGE), "report.json")


def partial_url(cfg: RunConfig, rank: int, world: int) -> str:
    return storage.join(manifest.stage_dir(cfg, STAGE), "partial", f"rank-{rank:05d}-of-{world:05d}.pt")


# ---------------------------------------------------------------------------------------------
# The work and its partial sums


def plan_units(test_shards: list[dict[str, Any]], n_test: int, n_samples: int, chunk: int) -> list[tuple[str, int]]:
    """The units of work in order: ("test", shard index) for shards holding any of the first n_test
    test images, then ("samples", chunk index) covering sample indices [c·chunk, (c+1)·chunk) ∩ [0, n_samples)."""
    units, offset = [], 0
    for i, entry in enumerate(test_shards):
        if offset >= n_test:
            break
        units.append(("test", i))
        offset += entry["count"]
    return units + [("samples", c) for c in range(-(-n_samples // chunk))]


def unit_id(unit: tuple[str, int]) -> str:
    return f"{unit[0]}-{unit[1]}"


class Sums:
    """One rank's partial sums of everything the report reduces, and the units they cover."""

    def __init__(self, latent_dim: int, fid: FIDEvaluator | None):
        self.sq_err = torch.zeros((), dtype=torch.float64)  # Σ (x̂ − x)² over test pixels
        self.pixels = torch.zeros((), dtype=torch.float64)  # number of test pixels
        self.var_sum = torch.zeros(latent_dim, dtype=torch.float64)  # Σ σ² per latent dimension
        self.z, self.u = FeatureStats(latent_dim), FeatureStats(latent_dim)  # aggregated posteriors q(z), q(u)
        self.fid = fid
        self.done: list[str] = []  # finished units, "test-3" / "samples-12"

    def state_dict(self) -> dict[str, Any]:
        return {"sq_err": self.sq_err, "pixels": self.pixels, "var_sum": self.var_sum,
                "z": self.z.state_dict(), "u": self.u.state_dict(), "done": list(self.done),
                "fid": self.fid.state_dict() if self.fid is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sq_err, self.pixels, self.var_sum = state["sq_err"], state["pixels"], state["var_sum"]
        self.z.load_state_dict(state["z"])
        self.u.load_state_dict(state["u"])
        self.done = list(state["done"])
        if self.fid is not None:
            self.fid.load_state_dict(state["fid"])

    def all_reduce(self) -> None:
        """Sum over ranks in place (a collective)."""
        for t in (self.sq_err, self.pixels, self.var_sum):
            dist.all_reduce_sum(t)
        self.z.all_reduce()
        self.u.all_reduce()


def _fingerprint(cfg: RunConfig, n_test: int, units: list[tuple[str, int]], fid: FIDEvaluator | None,
                 world: int) -> str:
    """What partial sums depend on: models, data, the units, the FID sets. A resume must match it."""
    parts = [manifest.sha256_of(storage.join(manifest.stage_dir(cfg, s), "model.pt")) for s in ("stage1", "stage2")]
    parts += [manifest.sha256_of(storage.join(cfg.dataset_root, "manifest.json")), cfg.seed, n_test,
              cfg.eval.num_samples, cfg.eval.batch_size, cfg.stage1.precision, units, world]
    parts += [sorted(fid.stats), fid.reference_url] if fid is not None else ["no-fid"]
    return f"{stable_seed(*parts):016x}"


class PartialStore:
    """This rank's partial sums in storage: saved atomically, loaded only under the same fingerprint."""

    def __init__(self, url: str, fingerprint: str, every_s: float):
        self.url, self.fingerprint, self.every_s = url, fingerprint, every_s
        self.last_save = time.monotonic()

    def load(self, sums: Sums) -> bool:
        if not storage.exists(self.url):
            return False
        body = torch.load(io.BytesIO(storage.read_bytes(self.url)), map_location="cpu", weights_only=True)
        if body.get("fingerprint") != self.fingerprint:
            log.warning("evaluate: ignoring %s: made for other models, data or settings", self.url)
            return False
        sums.load_state_dict(body["state"])
        return True

    def save(self, sums: Sums) -> None:
        body = {"fingerprint": self.fingerprint, "state": sums.state_dict()}
        storage.write_bytes_atomic(self.url, storage.torch_save_bytes(body))
        self.last_save = time.monotonic()

    def maybe_save(self, sums: Sums) -> None:
        if time.monotonic() - self.last_save >= self.every_s:
            self.save(sums)


# ---------------------------------------------------------------------------------------------
# The units


@torch.no_grad()
def _test_unit(cfg: RunConfig, device: torch.device, keys: list[str], images: np.ndarray, stage1: torch.nn.Module,
               stage2: torch.nn.Module, sums: Sums) -> None:
    """Reconstructions, posterior variances, q(z) and q(u), and FID features of some test images."""
    kappa = cfg.model.latent_dim
    for start in range(0, len(keys), cfg.eval.batch_size):
        part = keys[start:start + cfg.eval.batch_size]
        x = unit_float(images[start:start + cfg.eval.batch_size]).to(device)
        with precision.autocast(cfg.stage1.precision, device):
            mu, log_sigma = stage1.encode(x)
            recon = stage1.decode(mu)
        mu, log_sigma, recon = mu.float(), log_sigma.float(), recon.float().clamp(0, 1)
        sums.sq_err += ((recon - x) ** 2).double().sum().cpu()
        sums.pixels += x.numel()
        sums.var_sum += (2 * log_sigma).exp().double().sum(0).cpu()
        z = mu + log_sigma.exp() * keyed_normal(part, kappa, cfg.seed, "eval-z").to(device)
        sums.z.add(z.cpu())
        mu_u, log_sigma_u = stage2.encode(z)
        u = mu_u + log_sigma_u.exp() * keyed_normal(part, kappa, cfg.seed, "eval-u").to(device)
        sums.u.add(u.float().cpu())
        if sums.fid is not None:
            if sums.fid.needs_test:
                sums.fid.add(TEST, x)
            sums.fid.add("reconstructions", recon)


@torch.no_grad()
def _samples_unit(cfg: RunConfig, device: torch.device, indices: range, stage1: torch.nn.Module,
                  stage2: torch.nn.Module, sums: Sums) -> None:
    """Stage-1 and stage-2 samples with the given indices, into their FID statistics."""
    assert sums.fid is not None, "sample units exist only when FID is computed"
    for mode in MODES:
        images = sample_images(mode, stage1, stage2, indices, cfg.model.latent_dim, cfg.seed, PURPOSE, device)
        sums.fid.add(f"{mode}_samples", images.to(device))


def _run_units(cfg: RunConfig, info: dist.DistInfo, data: dict[str, Any], units: list[tuple[str, int]], n_test: int,
               stage1: torch.nn.Module, stage2: torch.nn.Module, sums: Sums, store: PartialStore,
               stop: StopFlag) -> None:
    """This rank's unfinished units, in rounds (round r: unit r·world + rank), agreeing on stops between rounds."""
    shards = data["splits"]["test"]["shards"]
    offsets = np.cumsum([0] + [e["count"] for e in shards]).tolist()
    done = set(sums.done)
    mine = [k for k in range(info.rank, len(units), info.world_size) if unit_id(units[k]) not in done]
    test_entries = [shards[units[k][1]] for k in mine if units[k][0] == "test"]
    pending = set(mine)
    with ShardPrefetcher(cfg.dataset_root, test_entries, list(data["shape"]), cfg.eval.workers) as decoded:
        for r in range(-(-len(units) // info.world_size)):
            if dist.any_rank(stop.is_set(), info.device):
                store.save(sums)
                raise Preempted(f"evaluate: stopped by {stop.signal_name or 'request'} after "
                                f"{len(sums.done)} unit(s) on rank {info.rank}")
            k = r * info.world_size + info.rank
            if k not in pending:
                continue
            kind, index = units[k]
            if kind == "test":
                name, keys, images = next(decoded)
                assert name == shards[index]["name"], f"evaluate: read {name}, expected {shards[index]['name']}"
                keep = max(0, min(len(keys), n_test - offsets[index]))  # only the first n_test images
                _test_unit(cfg, info.device, keys[:keep], images[:keep], stage1, stage2, sums)
            else:
                start = index * cfg.eval.batch_size
                _samples_unit(cfg, info.device, range(start, min(start + cfg.eval.batch_size, cfg.eval.num_samples)),
                              stage1, stage2, sums)
            sums.done.append(unit_id(units[k]))
            store.maybe_save(sums)


# ---------------------------------------------------------------------------------------------
# Diagnostics, plots and the report (rank 0)


def _prior_distance(stats: FeatureStats) -> float | None:
    """Fréchet distance between the Gaussian fit of an aggregated posterior and N(0, I)."""
    if stats.count < 2:
        return None
    mu, cov = stats.mean_cov()
    return float(frechet_distance(mu, cov, np.zeros_like(mu), np.eye(len(mu))))


def training_curves(cfg: RunConfig) -> dict[str, list[list[float]]]:
    """(samples seen, γ) pairs of each training stage, from its metrics log."""
    curves = {}
    for stage in ("stage1", "stage2"):
        url = storage.join(manifest.stage_dir(cfg, stage), "metrics.jsonl")
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


@torch.no_grad()
def _grids(cfg: RunConfig, data: dict[str, Any], stage1: torch.nn.Module, stage2: torch.nn.Module,
           device: torch.device) -> dict[str, torch.Tensor]:
    """The report's image grids: the first test images over their reconstructions; the first samples."""
    n = cfg.eval.grid_images
    keys, images = decode_image_shard(cfg.dataset_root, data["splits"]["test"]["shards"][0], list(data["shape"]))
    x = unit_float(images[:max(1, n // 2)]).to(device)
    with precision.autocast(cfg.stage1.precision, device):
        recon = stage1.decode(stage1.encode(x)[0])
    out = {"reconstructions": torch.cat([x.cpu(), recon.float().clamp(0, 1).cpu()])}
    for mode in MODES:  # the same images as the first samples of the FID sets
        out[f"{mode}_samples"] = sample_images(mode, stage1, stage2, range(n), cfg.model.latent_dim, cfg.seed,
                                               PURPOSE, device)
    return out


def run(cfg: RunConfig, stop: StopFlag | None = None) -> str:
    """Evaluate the run (resuming from saved partial sums); returns the URL of report.json."""
    stop = stop or StopFlag().install()
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0)
    data = ensure_dataset_once(cfg, info)
    stage1 = load_model(cfg, "stage1").to(info.device)
    stage2 = load_model(cfg, "stage2").to(info.device)
    n_test = min(cfg.eval.num_test, data["splits"]["test"]["count"])
    fid, fid_status = FIDEvaluator.create(cfg, data, n_test, info)

    # Plan the units, resume this rank's partial sums if any, do the rest, reduce.
    units = plan_units(data["splits"]["test"]["shards"], n_test, cfg.eval.num_samples if fid else 0,
                       cfg.eval.batch_size)
    sums = Sums(cfg.model.latent_dim, fid)
    store = PartialStore(partial_url(cfg, info.rank, info.world_size),
                         _fingerprint(cfg, n_test, units, fid, info.world_size), cfg.eval.checkpoint_every_s)
    if store.load(sums):
        log.info("evaluate: rank %d resumes with %d of its units done", info.rank, len(sums.done))
    _run_units(cfg, info, data, units, n_test, stage1, stage2, sums, store, stop)
    sums.all_reduce()
    fid_result = fid.finish(info.is_main) if fid is not None else {}
    if not info.is_main:
        dist.barrier()
        return report_url(cfg)

    # The report (rank 0): diagnostics, FID beside the paper's numbers, images and plots.
    out_dir = manifest.stage_dir(cfg, STAGE)
    posterior_var = (sums.var_sum / max(n_test, 1)).tolist()
    threshold = cfg.eval.active_var_threshold
    curves = training_curves(cfg)
    files = {}
    for name, batch in _grids(cfg, data, stage1, stage2, info.device).items():
        files[name] = f"{name}.png"
        storage.write_bytes_atomic(storage.join(out_dir, files[name]), png_bytes(grid(batch)))
    files["diagnostics"] = "diagnostics.png"
    storage.write_bytes_atomic(storage.join(out_dir, files["diagnostics"]), plot_png(curves, posterior_var, threshold))
    report = {
        "dataset": cfg.dataset.name,
        "run_dir": cfg.run_dir,
        "test_images": n_test,
        "samples": cfg.eval.num_samples if fid is not None else 0,
        "reconstruction_mse": float(sums.sq_err / sums.pixels),
        "gamma_x": math.exp(stage1.log_gamma.item()) if hasattr(stage1, "log_gamma") else None,
        "gamma_z": math.exp(stage2.log_gamma.item()),
        "active_dims": {
            "count": sum(v < threshold for v in posterior_var), "latent_dim": cfg.model.latent_dim,
            "threshold": threshold, "true_dim": data.get("intrinsic_dim"), "posterior_variance": posterior_var,
        },
        "frechet_to_prior": {"z": _prior_distance(sums.z), "u": _prior_distance(sums.u)},
        "fid": {"status": fid_status, **fid_result},
        "paper_table1": PAPER_TABLE1.get(cfg.dataset.name),
        "paper_table2": PAPER_TABLE2.get(cfg.dataset.name) if cfg.model.family == "wae" else None,
        "images": files,
        "training": {s: manifest.read(cfg, s).get("metrics", {}) for s in ("stage1", "stage2")},
        "gamma_curves": curves,
    }
    url = report_url(cfg)
    storage.write_text_atomic(url, json.dumps(report, indent=2) + "\n")
    storage.write_text_atomic(storage.join(out_dir, "report.md"), render_markdown(report))
    manifest.write(cfg, STAGE,
                   consumed={s: manifest.artifact(storage.join(manifest.stage_dir(cfg, s), "model.pt"))
                             for s in ("stage1", "stage2")},
                   produced={"report": manifest.artifact(url)})
    # The report is committed: the partial sums (of this and of any earlier world size) are no longer needed.
    storage.remove(storage.join(out_dir, "partial"))
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
        f"Run: `{report['run_dir']}`, {report['test_images']} test images, {report['samples']} samples per FID set.",
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


if __name__ == "__main__":
    from tsvae_dist.cli import main

    main(run)
