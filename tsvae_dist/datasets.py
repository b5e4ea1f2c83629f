"""Resolve the run's dataset to a shard manifest, building the embedded synthetic set on first use."""

from __future__ import annotations

from typing import Any

from tsvae_dist import dist
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import ConfigError, DataError
from tsvae_dist.shardformat import read_manifest


def ensure_dataset(cfg: RunConfig) -> dict[str, Any]:
    """The dataset's manifest, checked against the config. Builds the synthetic set if missing."""
    root = cfg.dataset_root
    if cfg.dataset.name == "synthetic":
        from shards.synthetic import ensure_synthetic

        d = cfg.dataset
        manifest = ensure_synthetic(root, resolution=d.resolution, train=d.synthetic_train, test=d.synthetic_test,
                                    samples_per_shard=d.synthetic_samples_per_shard)
    else:
        try:
            manifest = read_manifest(root)
        except (FileNotFoundError, DataError) as e:
            source = "celeba" if cfg.dataset.name.startswith("celeba") else cfg.dataset.name
            resolution = f" --resolution {cfg.dataset.resolution}" if source == "celeba" else ""
            raise DataError(
                f"dataset.root: no usable shards at {root} ({e}); build them with `python -m shards "
                f"{source} --src <downloaded files> --out {root}{resolution}` (see README)"
            ) from None
    want = [cfg.dataset.channels, cfg.dataset.resolution, cfg.dataset.resolution]
    if manifest["kind"] != "image" or list(manifest["shape"]) != want:
        raise ConfigError(
            f"dataset.resolution/dataset.channels: config says [C,H,W]={want} but {root}/manifest.json "
            f"holds {manifest['kind']} samples of shape {manifest['shape']}"
        )
    return manifest


def ensure_dataset_once(cfg: RunConfig, info: dist.DistInfo) -> dict[str, Any]:
    """`ensure_dataset` on rank 0 first (it may build), then on the others."""
    if info.is_main:
        manifest = ensure_dataset(cfg)
    dist.barrier()
    if not info.is_main:
        manifest = ensure_dataset(cfg)
    return manifest
