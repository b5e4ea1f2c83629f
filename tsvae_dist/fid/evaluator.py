"""FID inside the evaluation job: Inception features reduced as sufficient statistics across ranks.

`eval.fid` decides what happens when the Inception weights are not usable: `required` fails the
configuration check before any job is submitted (`fid.weights.check_fid_config`, called by
launch/submit.py), `auto` evaluates without FID and says in the report what to configure, `off` skips FID.

Reference statistics of the test split (the first `eval.num_test` images, the training
preprocessing) are cached in storage under a name made of the dataset manifest's hash, the
resolution, the number of images and the network's hash, and reused by later runs.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

from tsvae_dist import storage
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import ConfigError
from tsvae_dist.fid.inception import FEATURE_DIM, extract_features, load_inception
from tsvae_dist.fid.stats import FeatureStats, frechet_distance, load_reference_stats, save_reference_stats
from tsvae_dist.fid.weights import fid_unavailable_reason
from tsvae_dist.runtime import dist

log = logging.getLogger(__name__)
SETS = ("reconstructions", "stage1_samples", "stage2_samples")  # the paper's three FIDs
TEST = "test"  # the reference set's name among the statistics


def reference_url(cfg: RunConfig, data: dict[str, Any], n_test: int, weights_sha: str) -> str:
    """Where the test split's reference statistics are cached for this dataset, size and network."""
    manifest_sha = hashlib.sha256(storage.read_bytes(storage.join(cfg.dataset_root, "manifest.json"))).hexdigest()
    name = (f"{data['name']}-{cfg.dataset.resolution}px-test{n_test}-data{manifest_sha[:16]}"
            f"-net{weights_sha[:16]}.npz")
    return storage.join(cfg.eval.cache_dir, "fid-reference", name)


class FIDEvaluator:
    """Accumulates Inception statistics per image set; `finish` reduces them and returns the FIDs.

    The per-rank partial sums are exposed through `state_dict`/`load_state_dict` so a preempted
    evaluation resumes without recomputing features.
    """

    def __init__(self, net: torch.nn.Module, device: torch.device, reference_url: str,
                 reference: tuple[np.ndarray, np.ndarray] | None):
        self.net, self.device = net, device
        self.reference_url = reference_url
        self.reference = reference  # (μ, Σ) of the test split when cached, else computed in `finish`
        self.reference_cached = reference is not None
        names = SETS if self.reference_cached else (TEST, *SETS)
        self.stats = {name: FeatureStats(FEATURE_DIM, device) for name in names}

    @classmethod
    def create(cls, cfg: RunConfig, data: dict[str, Any], n_test: int, info: dist.DistInfo
               ) -> tuple[FIDEvaluator | None, str]:
        """An evaluator, or None and the reason FID is skipped (eval.fid=auto with unusable weights)."""
        reason = fid_unavailable_reason(cfg)
        if reason is not None:
            return None, reason
        try:
            if info.local_rank != 0:  # local rank 0 downloads into the cache first
                dist.barrier()
            try:
                net = load_inception(cfg.eval.inception_weights, cfg.eval.inception_sha256 or None,
                                     cfg.eval.cache_dir)
            finally:
                if info.local_rank == 0:
                    dist.barrier()
        except ConfigError as e:
            if cfg.eval.fid == "required":
                raise
            return None, f"skipped: {e} (eval.fid=auto)"
        net = net.to(info.device).eval()
        url = reference_url(cfg, data, n_test, net.weights_sha256 or "unknown")
        reference = None
        # One decision for all ranks: they must accumulate the same sets (another run may write the cache now).
        if dist.broadcast_object(storage.exists(url)):
            mu, sigma, _ = load_reference_stats(url)
            reference = (mu, sigma)
            log.info("FID reference statistics: cached %s", url)
        return cls(net, info.device, url, reference), "computed"

    @property
    def needs_test(self) -> bool:
        """True when the test split's features must be computed (no cached reference)."""
        return not self.reference_cached

    @torch.no_grad()
    def add(self, name: str, images: torch.Tensor) -> None:
        """Add a batch of images in [0, 1] (N, C, H, W) to set `name`."""
        if name == TEST and self.reference_cached:
            return
        # Quantise as an image file would: the TF graph is defined on uint8 pixels.
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).to(self.device)
        self.stats[name].add(extract_features(self.net, pixels))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's partial sums of every set."""
        return {name: stats.state_dict() for name, stats in self.stats.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, stats in self.stats.items():
            stats.load_state_dict(state[name])

    def finish(self, is_main: bool) -> dict[str, Any]:
        """All-reduce the sums (a collective: every rank calls it); FID of each set against the test split.

        Only rank 0 (`is_main`) computes the distances (three 2048-d eigendecompositions; the other
        ranks return {}) and writes the reference statistics to the cache when they were computed here.
        """
        for stats in self.stats.values():
            stats.all_reduce()
        if not is_main:
            return {}
        if self.reference is None:
            self.reference = self.stats[TEST].mean_cov()
            save_reference_stats(self.reference_url, *self.reference, count=self.stats[TEST].count)
        mu_ref, sigma_ref = self.reference
        out: dict[str, Any] = {}
        for name in SETS:
            if self.stats[name].count > 1:
                mu, sigma = self.stats[name].mean_cov()
                out[name] = float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
        out["counts"] = {name: stats.count for name, stats in self.stats.items()}
        out["reference"] = {"url": self.reference_url, "cached": self.reference_cached}
        return out
