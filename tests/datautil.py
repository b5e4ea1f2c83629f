"""Helpers that build small datasets in the shard format for tests (no downloads, all in tmp dirs)."""

from __future__ import annotations

import numpy as np

from tsvae_dist.data import shardformat
from tsvae_dist.data.prefetch import decode_image_shard
from tsvae_dist.data.synthetic import build_synthetic
from tsvae_dist.data.writer import ShardWriter, finish_dataset


def build_images(root: str, *, train: int = 230, test: int = 50, per_shard: int = 20, resolution: int = 8,
                 seed: int = 0) -> dict:
    """A tiny synthetic image dataset (8×8 RGB discs by default: 12 train shards, the last one short)."""
    return build_synthetic(root, resolution=resolution, train=train, test=test, samples_per_shard=per_shard,
                           seed=seed)


def latent_value(key: str, kappa: int) -> tuple[np.ndarray, np.ndarray]:
    """The (mu, log_sigma) stored for `key` by `build_latents`: recoverable from the key alone."""
    index = int(key.rsplit("-", 1)[1])
    mu = np.arange(kappa, dtype=np.float32) + index
    return mu, -mu / 1000.0


def build_latents(root: str, *, train: int = 120, per_shard: int = 10, kappa: int = 5) -> dict:
    """A latent dataset whose values encode their keys (see `latent_value`)."""
    splits = {}
    for split, count in (("train", train), ("test", max(1, train // 4))):
        with ShardWriter(root, split, per_shard) as writer:
            for i in range(count):
                key = f"{split}-{i:08d}"
                writer.add(key, shardformat.encode_latent(*latent_value(key, kappa)))
        splits[split] = writer.close()
    return finish_dataset(root, name="test-latents", kind="latent", shape=[kappa], splits=splits,
                          source={"test": True}, encoder={"checkpoint": "none", "sha256": "0" * 64})


def build_custom(root: str, samples: list[tuple[str, dict[str, bytes]]], *, shape: list[int],
                 kind: str = "image", per_shard: int = 4) -> dict:
    """A dataset holding exactly `samples` as its train split, with a consistent manifest (error cases)."""
    with ShardWriter(root, "train", per_shard) as writer:
        for key, files in samples:
            writer.add(key, files)
    return finish_dataset(root, name="custom", kind=kind, shape=shape, splits={"train": writer.close()},
                          source={"test": True})


def rgb(h: int, w: int, value: int = 7) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def split_images(root: str, split: str) -> dict[str, np.ndarray]:
    """{key: uint8 [C,H,W]} of every image of a split, decoded as the encode and evaluate stages decode."""
    manifest = shardformat.read_manifest(root)
    out: dict[str, np.ndarray] = {}
    for entry in manifest["splits"][split]["shards"]:
        keys, images = decode_image_shard(shardformat.dataset_root(root), entry, manifest["shape"],
                                          manifest.get("decode"))
        out.update(zip(keys, images, strict=True))
    return out
