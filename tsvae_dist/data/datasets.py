"""Resolve a run's dataset to its shard manifest, building the embedded synthetic set on first use."""

from __future__ import annotations

from typing import Any

from tsvae_dist.data.config import DatasetConfig
from tsvae_dist.data.shardformat import manifest_url, read_manifest
from tsvae_dist.data.synthetic import ensure_synthetic
from tsvae_dist.errors import ConfigError, DataError


def _build_command(d: DatasetConfig, root: str) -> str:
    builder = d.source or ("folder" if d.name == "folder" else d.name)
    resolution = f" --resolution {d.resolution}" if builder in ("celeba", "celebahq", "folder") else ""
    return f"`python -m shards {builder} --src <downloaded files> --out {root}{resolution}`"


def ensure_dataset(d: DatasetConfig, root: str) -> dict[str, Any]:
    """The manifest of the dataset at `root`, checked against the config. Builds the synthetic set if missing."""
    if d.name == "synthetic":
        manifest = ensure_synthetic(root, resolution=d.resolution, train=d.synthetic_train, test=d.synthetic_test,
                                    samples_per_shard=d.synthetic_samples_per_shard)
    else:
        try:
            manifest = read_manifest(root)
        except (FileNotFoundError, DataError) as e:
            raise DataError(f"dataset.root: no usable shards at {root} ({e}); build them with "
                            f"{_build_command(d, root)} (see README)") from None
        built_from = manifest["source"].get("dataset")
        if d.source and built_from != d.source:
            raise ConfigError(
                f"dataset.source: the {d.name} preset expects shards built from {d.source!r}, but "
                f"{manifest_url(root)} was built from {built_from or 'an unnamed source'!r}; build them with "
                f"{_build_command(d, root)}, or set dataset.source= to accept these")
    want = [d.channels, d.resolution, d.resolution]
    if manifest["kind"] != "image" or list(manifest["shape"]) != want:
        raise ConfigError(
            f"dataset.resolution/dataset.channels: config says [C,H,W]={want} but {manifest_url(root)} "
            f"holds {manifest['kind']} samples of shape {manifest['shape']}"
        )
    return manifest
