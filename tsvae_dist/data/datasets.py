"""Resolve a run's dataset to its shard manifest, building the embedded synthetic set on first use."""

from __future__ import annotations

from typing import Any

from tsvae_dist.data.config import DatasetConfig
from tsvae_dist.data.shardformat import manifest_url, read_manifest
from tsvae_dist.data.synthetic import ensure_synthetic
from tsvae_dist.errors import ConfigError, DataError


def ensure_dataset(d: DatasetConfig, root: str) -> dict[str, Any]:
    """The manifest of the dataset at `root`, checked against the config. Builds the synthetic set if missing."""
    if d.name == "synthetic":
        manifest = ensure_synthetic(root, resolution=d.resolution, train=d.synthetic_train, test=d.synthetic_test,
                                    samples_per_shard=d.synthetic_samples_per_shard)
    else:
        try:
            manifest = read_manifest(root)
        except (FileNotFoundError, DataError) as e:
            source = "celeba" if d.name.startswith("celeba") else d.name
            resolution = f" --resolution {d.resolution}" if source == "celeba" else ""
            raise DataError(
                f"dataset.root: no usable shards at {root} ({e}); build them with `python -m shards "
                f"{source} --src <downloaded files> --out {root}{resolution}` (see README)"
            ) from None
    want = [d.channels, d.resolution, d.resolution]
    if manifest["kind"] != "image" or list(manifest["shape"]) != want:
        raise ConfigError(
            f"dataset.resolution/dataset.channels: config says [C,H,W]={want} but {manifest_url(root)} "
            f"holds {manifest['kind']} samples of shape {manifest['shape']}"
        )
    return manifest
