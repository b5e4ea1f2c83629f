"""FID inside the evaluation job: Inception features reduced as sufficient statistics across ranks.

Reference statistics of the test split are cached in storage by (dataset manifest hash, number
of test images, network hash) and reused by later runs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from tsvae_dist import dist, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import ConfigError
from tsvae_dist.fid import (
    FEATURE_DIM,
    FeatureStats,
    extract_features,
    frechet_distance,
    load_inception,
    load_reference_stats,
    save_reference_stats,
)
from tsvae_dist.noise import stable_seed

log = logging.getLogger(__name__)
SETS = ("reconstructions", "stage1_samples", "stage2_samples")


def fid_unavailable_reason(cfg: RunConfig) -> str | None:
    """Why FID cannot be computed under this config (None when it can be attempted)."""
    if cfg.eval.fid == "off":
        return "off (eval.fid=off)"
    if not cfg.eval.inception_weights:
        return ("skipped: eval.inception_weights is not set; set it to the path or URL of "
                "pt_inception-2015-12-05-6726825d.pth (and eval.fid=required to insist)")
    return None


def check_fid_config(cfg: RunConfig) -> None:
    """Before any job: with eval.fid=required, the weights must be configured and present."""
    if cfg.eval.fid != "required":
        return
    reason = fid_unavailable_reason(cfg)
    if reason is not None:
        raise ConfigError(f"eval.inception_weights: eval.fid=required but {reason}")
    w = cfg.eval.inception_weights
    if "://" not in w and not storage.exists(w):
        raise ConfigError(f"eval.inception_weights: eval.fid=required but {w} does not exist")


class FIDEvaluator:
    """Accumulates Inception statistics per image set; `finish` reduces them and returns FIDs."""

    def __init__(self, net: torch.nn.Module, device: torch.device, reference_url: str,
                 reference: tuple[np.ndarray, np.ndarray] | None):
        self.net, self.device = net, device
        self.reference_url, self.reference = reference_url, reference
        self.stats = {name: FeatureStats(FEATURE_DIM) for name in ("test", *SETS)}

    @classmethod
    def create(cls, cfg: RunConfig, data: dict[str, Any], info: dist.DistInfo) -> tuple[FIDEvaluator | None, str]:
        """An evaluator, or None with the reason FID is skipped (eval.fid=auto without weights)."""
        reason = fid_unavailable_reason(cfg)
        if reason is not None:
            return None, reason
        if info.local_rank != 0:  # local rank 0 downloads into the cache first
            dist.barrier()
        net = load_inception(cfg.eval.inception_weights, cfg.eval.inception_sha256 or None, cfg.eval.cache_dir)
        if info.local_rank == 0:
            dist.barrier()
        net = net.to(info.device).eval()
        weights_sha = getattr(net, "weights_sha256", "unknown")
        key = stable_seed(data["name"], storage.read_text(storage.join(cfg.dataset_root, "manifest.json")),
                          min(cfg.eval.num_test, data["splits"]["test"]["count"]), weights_sha)
        reference_url = storage.join(cfg.eval.cache_dir, "fid-reference", f"{data['name']}-{key:016x}.npz")
        reference = None
        if storage.exists(reference_url):
            mu, sigma, _ = load_reference_stats(reference_url)
            reference = (mu, sigma)
        return cls(net, info.device, reference_url, reference), "computed"

    @torch.no_grad()
    def add(self, name: str, images: torch.Tensor) -> None:
        """Add a batch of images in [0, 1] (N, C, H, W) to set `name`."""
        if name == "test" and self.reference is not None:
            return  # cached
        # Quantise as an image file would: the TF graph is defined on uint8 pixels.
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).to(self.device)
        self.stats[name].add(extract_features(self.net, pixels).double().cpu())

    def finish(self) -> dict[str, float]:
        """All-reduce the sums; FID of each generated set against the test split's statistics."""
        for stats in self.stats.values():
            stats.all_reduce()
        if self.reference is None:
            self.reference = self.stats["test"].mean_cov()
            if _is_rank0():
                save_reference_stats(self.reference_url, *self.reference, count=self.stats["test"].count)
        mu_ref, sigma_ref = self.reference
        out = {}
        for name in SETS:
            if self.stats[name].count > 1:
                mu, sigma = self.stats[name].mean_cov()
                out[name] = float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
        return out


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
