"""What the stage jobs share (not a stage itself): the dataset, resolved once per job; trained models."""

from __future__ import annotations

from typing import Any

import torch

from tsvae_dist.config import RunConfig
from tsvae_dist.data.datasets import ensure_dataset
from tsvae_dist.models.io import load_model
from tsvae_dist.runtime import dist


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
