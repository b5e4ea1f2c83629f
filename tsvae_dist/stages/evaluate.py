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

from tsvae_dist import records, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.data.prefetch import ShardPrefetcher, decode_image_shard, decode_image_shard_skipping
from tsvae_dist.data.shardformat import manifest_url
from tsvae_dist.data.workers import unit_float_on
from tsvae_dist.fid.evaluator import TEST, FIDEvaluator
from tsvae_dist.fid.stats import FeatureStats, frechet_distance
from tsvae_dist.layout import TRAINING_STAGES
from tsvae_dist.models.sampling import MODES, grid, png_bytes, sample_images
from tsvae_dist.report import (
    PAPER_TABLE1,
    PAPER_TABLE2,
    curve,
    gamma_convergence,
    plot_png,
    prior_verdict,
    protocol_deviations,
    read_metrics,
    render_markdown,
    split_info,
    stage2_inactive_error,
    training_curves,
)
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.noise import keyed_normal, stable_seed
from tsvae_dist.runtime.preemption import Preempted, StopFlag
from tsvae_dist.stages._common import ensure_dataset_once, load_trained
from tsvae_dist.train import precision

log = logging.getLogger(__name__)
STAGE = "evaluate"
PURPOSE = "eval"  # the noise purpose of evaluation samples (`generate` uses its own)
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
        self.z_sq_err = torch.zeros(latent_dim, dtype=torch.float64)  # Σ (z − ẑ(μ_u))² per dim: stage 2's error
        self.z, self.u = FeatureStats(latent_dim), FeatureStats(latent_dim)  # aggregated posteriors q(z), q(u)
        self.fid = fid
        self.skipped = torch.zeros((), dtype=torch.float64)  # bad test samples left out (the loader's skip policy)
        self.done: list[str] = []  # finished units, "test-3" / "samples-12"

    def state_dict(self) -> dict[str, Any]:
        return {"sq_err": self.sq_err, "pixels": self.pixels, "var_sum": self.var_sum, "skipped": self.skipped,
                "z_sq_err": self.z_sq_err,
                "z": self.z.state_dict(), "u": self.u.state_dict(), "done": list(self.done),
                "fid": self.fid.state_dict() if self.fid is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sq_err, self.pixels, self.var_sum = state["sq_err"], state["pixels"], state["var_sum"]
        self.skipped = state.get("skipped", torch.zeros((), dtype=torch.float64))
        self.z_sq_err = state["z_sq_err"]
        self.z.load_state_dict(state["z"])
        self.u.load_state_dict(state["u"])
        self.done = list(state["done"])
        if self.fid is not None:
            self.fid.load_state_dict(state["fid"])

    def all_reduce(self) -> None:
        """Sum over ranks in place (a collective)."""
        for t in (self.sq_err, self.pixels, self.var_sum, self.skipped, self.z_sq_err):
            dist.all_reduce_sum(t)
        self.z.all_reduce()
        self.u.all_reduce()


def _fingerprint(cfg: RunConfig, n_test: int, units: list[tuple[str, int]], fid: FIDEvaluator | None,
                 world: int, device: torch.device) -> str:
    """What partial sums depend on: models, data, the units, the FID sets, the precision as resolved on
    `device` (auto is bf16 on CUDA only). A resume must match it."""
    parts = [records.sha256_of(cfg.layout.model(s)) for s in TRAINING_STAGES]
    parts += [records.sha256_of(manifest_url(cfg.dataset_root)), cfg.seed, n_test,
              cfg.eval.num_samples, cfg.eval.batch_size, precision.resolve(cfg.stage1.precision, device), units, world]
    parts += [sorted(fid.stats), fid.reference_url] if fid is not None else ["no-fid"]
    parts.append("sums:z_sq_err")  # what Sums holds: partial sums saved before stage 2's error was summed lack it
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
        x = unit_float_on(torch.from_numpy(images[start:start + cfg.eval.batch_size]), device)
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
        # Stage 2's reconstruction of z from the mean of q(u|z), as stage 1's uses the mean of q(z|x).
        sums.z_sq_err += ((stage2.decode(mu_u).float() - z) ** 2).double().sum(0).cpu()
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
    with ShardPrefetcher(cfg.dataset_root, test_entries, list(data["shape"]), cfg.eval.workers,
                         cfg.stage1.loader.max_skipped_samples, info.rank, data.get("decode")) as decoded:
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
                before = decoded.skipped
                name, keys, images = next(decoded)
                assert name == shards[index]["name"], f"evaluate: read {name}, expected {shards[index]['name']}"
                sums.skipped += decoded.skipped - before
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


@torch.no_grad()
def _grids(cfg: RunConfig, data: dict[str, Any], stage1: torch.nn.Module, stage2: torch.nn.Module,
           device: torch.device) -> dict[str, torch.Tensor]:
    """The report's image grids: the first test images over their reconstructions; the first samples."""
    n = cfg.eval.grid_images
    first = data["splits"]["test"]["shards"][0]
    if cfg.stage1.loader.max_skipped_samples:  # bad samples were skipped (and counted) by the test units
        keys, images, _ = decode_image_shard_skipping(cfg.dataset_root, first, list(data["shape"]), data.get("decode"))
    else:
        keys, images = decode_image_shard(cfg.dataset_root, first, list(data["shape"]), data.get("decode"))
    x = unit_float_on(torch.from_numpy(images[:max(1, n // 2)]), device)
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
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0, timeout_s=cfg.cluster.init_timeout_s)
    data = ensure_dataset_once(cfg, info)
    layout = cfg.layout
    stage1 = load_trained(cfg, "stage1").to(info.device)
    stage2 = load_trained(cfg, "stage2").to(info.device)
    n_test = min(cfg.eval.num_test, data["splits"]["test"]["count"])
    fid, fid_status = FIDEvaluator.create(cfg, data, n_test, info)

    # Plan the units, resume this rank's partial sums if any, do the rest, reduce.
    units = plan_units(data["splits"]["test"]["shards"], n_test, cfg.eval.num_samples if fid else 0,
                       cfg.eval.batch_size)
    sums = Sums(cfg.model.latent_dim, fid)
    store = PartialStore(layout.partial_sums_of(info.rank, info.world_size),
                         _fingerprint(cfg, n_test, units, fid, info.world_size, info.device),
                         cfg.eval.checkpoint_every_s)
    if store.load(sums):
        log.info("evaluate: rank %d resumes with %d of its units done", info.rank, len(sums.done))
    _run_units(cfg, info, data, units, n_test, stage1, stage2, sums, store, stop)
    sums.all_reduce()
    fid_result = fid.finish(info.is_main) if fid is not None else {}
    if not info.is_main:
        dist.barrier()
        return layout.report

    # The report (rank 0): diagnostics, FID beside the paper's numbers, images and plots.
    out_dir = layout.stage_dir(STAGE)
    posterior_var = (sums.var_sum / max(n_test, 1)).tolist()
    threshold = cfg.eval.active_var_threshold
    curves = training_curves(layout)
    stage2_rows = read_metrics(layout, "stage2")
    stage2_curves = {"loss": curve(stage2_rows, "loss"), "gamma": curve(stage2_rows, "gamma")}
    s1 = cfg.stage1  # log γ_x's learning rate over the schedule's: its own gamma_lr, or the same
    convergence = gamma_convergence(read_metrics(layout, "stage1"), s1.gamma,
                                    s1.gamma_lr / s1.lr if s1.gamma_lr else 1.0)
    frechet = {"z": _prior_distance(sums.z), "u": _prior_distance(sums.u)}
    if convergence["warning"]:
        log.warning("evaluate: %s", convergence["warning"])
    files = {}
    for name, batch in _grids(cfg, data, stage1, stage2, info.device).items():
        files[name] = f"{name}.png"
        storage.write_bytes_atomic(storage.join(out_dir, files[name]), png_bytes(grid(batch)))
    files["diagnostics"] = "diagnostics.png"
    storage.write_bytes_atomic(storage.join(out_dir, files["diagnostics"]), plot_png(curves, posterior_var, threshold,
                                                                                     stage2_curves["loss"]))
    report = {
        "dataset": cfg.dataset.name,
        "run_dir": cfg.run_dir,
        "test_images": int(sums.pixels.item()) // math.prod(data["shape"]),
        "test_split": split_info(data),
        "skipped_samples": int(sums.skipped.item()),
        "samples": cfg.eval.num_samples if fid is not None else 0,
        "reconstruction_mse": float(sums.sq_err / sums.pixels),
        "gamma_x": math.exp(stage1.log_gamma.item()) if hasattr(stage1, "log_gamma") else None,
        "gamma_z": math.exp(stage2.log_gamma.item()),
        "active_dims": {
            "count": sum(v < threshold for v in posterior_var), "latent_dim": cfg.model.latent_dim,
            "threshold": threshold, "true_dim": data.get("intrinsic_dim"), "posterior_variance": posterior_var,
        },
        "frechet_to_prior": frechet,
        "stage2_error": stage2_inactive_error((sums.z_sq_err / max(n_test, 1)).tolist(), posterior_var, threshold),
        "prior_verdict": prior_verdict(frechet),
        "stage1_convergence": convergence,
        "protocol_deviations": protocol_deviations({"stage1": cfg.stage1, "stage2": cfg.stage2}),
        "fid": {"status": fid_status, **fid_result},
        "paper_table1": PAPER_TABLE1.get(cfg.dataset.name),
        "paper_table2": PAPER_TABLE2.get(cfg.dataset.name) if cfg.model.family == "wae" else None,
        "images": files,
        "training": {s: records.read(layout, s).get("metrics", {}) for s in TRAINING_STAGES},
        "gamma_curves": curves,
        "stage2_curves": stage2_curves,
    }
    url = layout.report
    storage.write_text_atomic(url, json.dumps(report, indent=2) + "\n")
    storage.write_text_atomic(layout.report_markdown, render_markdown(report))
    records.write(cfg, STAGE, consumed={s: records.artifact(layout.model(s)) for s in TRAINING_STAGES},
                  produced={"report": records.artifact(url)}, extra={"skipped_samples": report["skipped_samples"]})
    # The report is committed: the partial sums (of this and of any earlier world size) are no longer needed.
    storage.remove(layout.partial_sums)
    dist.barrier()
    return url
