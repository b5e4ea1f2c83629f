"""What the stage jobs share (not a stage itself): the dataset, resolved once per job; trained models."""

from __future__ import annotations

from typing import Any

import torch

from tsvae_dist import records
from tsvae_dist.config import RunConfig, to_container
from tsvae_dist.data.datasets import ensure_dataset
from tsvae_dist.models.io import load_model, save_model
from tsvae_dist.runtime import dist
from tsvae_dist.train.loop import TrainResult


def ensure_dataset_once(cfg: RunConfig, info: dist.DistInfo) -> dict[str, Any]:
    """The run's dataset manifest (`ensure_dataset`), on rank 0 first (it may build), then on the others."""
    if info.is_main:
        manifest = ensure_dataset(cfg.dataset, cfg.dataset_root)
    dist.barrier()
    if not info.is_main:
        manifest = ensure_dataset(cfg.dataset, cfg.dataset_root)
    return manifest


def load_trained(cfg: RunConfig, stage: str, artifact: bytes | None = None) -> torch.nn.Module:
    """The run's trained `stage` model (stage1 or stage2), in eval mode on the CPU."""
    return load_model(cfg.layout.model(stage), stage, cfg.model, cfg.dataset.channels, cfg.dataset.resolution,
                      artifact)


def commit_trained(cfg: RunConfig, stage: str, result: TrainResult, info: dist.DistInfo,
                   consumed: dict[str, Any]) -> str:
    """A training stage's end: rank 0 writes the model artifact, then the stage's record; returns the model URL."""
    url = cfg.layout.model(stage)
    if info.is_main:
        save_model(url, result.model, to_container(cfg), stage, result.samples_seen)
        records.write(cfg, stage, consumed=consumed, produced={"model": records.artifact(url)},
                      extra={"metrics": result.last_metrics, "samples_seen": result.samples_seen,
                             "skipped_samples": result.skipped_samples})
    dist.barrier()
    return url
