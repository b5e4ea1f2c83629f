"""Whole image shards, decoded ahead in worker processes, in a fixed order: the reader of the encode and
evaluate stages (which go through shards unshuffled, one shard per unit of work)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tsvae_dist.data import shardformat
from tsvae_dist.data.workers import as_is, error_item, raise_if_error, stop_workers
from tsvae_dist.errors import DataError

log = logging.getLogger(__name__)


SKIP_SETTING = "stage1.loader.max_skipped_samples"  # the one skip policy of every stage reading the images


def decode_image_shard(root: str, entry: dict[str, Any], shape: list[int], decode: dict | None = None
                       ) -> tuple[list[str], np.ndarray]:
    """Keys and uint8 [N, C, H, W] images of one image shard, in file order (hash and count checked);
    `decode` is the manifest's field of that name (shardformat.decode_sample)."""
    keys, images, _ = _decode(root, entry, shape, skip=False, decode=decode)
    return keys, images


def decode_image_shard_skipping(root: str, entry: dict[str, Any], shape: list[int], decode: dict | None = None
                                ) -> tuple[list[str], np.ndarray, list[tuple[int, str]]]:
    """As `decode_image_shard`, leaving out bad samples: (keys, images, [(samples skipped, why)]). A bad
    shard (unreadable, wrong hash or count) skips all of its samples, as the training loader does."""
    return _decode(root, entry, shape, skip=True, decode=decode)


def _decode(root: str, entry: dict[str, Any], shape: list[int], skip: bool, decode: dict | None
            ) -> tuple[list[str], np.ndarray, list[tuple[int, str]]]:
    url = shardformat.shard_url(root, entry["name"])
    keys, images, skipped = [], [], []
    try:
        for key, files in shardformat.iter_tar(url, sha256=entry["sha256"], count=entry["count"]):
            try:
                images.append(shardformat.decode_sample(url, key, files, "image", shape, decode)["image"])
            except DataError as e:
                if not skip:
                    raise
                skipped.append((1, str(e)))
                continue
            keys.append(key)
    except DataError as e:
        if not skip:
            raise
        keys, images, skipped = [], [], [(entry["count"], str(e))]
    return keys, np.stack(images) if images else np.zeros((0, *shape), np.uint8), skipped


class _ShardReader(IterableDataset):
    """Decoded shards in the given order; worker w of W decodes shards w, w+W, ... (the DataLoader
    hands them back round-robin, i.e. in the original order)."""

    def __init__(self, root: str, entries: list[dict[str, Any]], shape: list[int], skip: bool,
                 decode: dict | None):
        self.root, self.entries, self.shape, self.skip, self.decode = root, entries, shape, skip, decode

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.entries if info is None else self.entries[info.id::info.num_workers]
        for entry in mine:
            try:
                keys, images, skipped = _decode(self.root, entry, self.shape, self.skip, self.decode)
            except DataError as e:
                if info is None:
                    raise
                yield error_item(e)
                return
            # From a worker, a tensor: it crosses to the main process through shared memory, not the pipe.
            yield {"name": entry["name"], "keys": keys, "skipped": skipped,
                   "images": images if info is None else torch.from_numpy(images)}


class ShardPrefetcher:
    """(name, keys, uint8 [N, C, H, W] images) of each shard in `entries`, in order, decoded ahead by
    `workers` processes (0: in this one, on demand); `decode` is the manifest's field of that name. A
    context manager: leaving it stops the workers, however the block ends.

    Bad samples follow the training loader's policy: with `max_skipped` > 0 they are left out, each
    logged with its shard and key and counted in `skipped` (samples this rank skipped); one more than
    `max_skipped` is a DataError, as is the first with `max_skipped` 0.
    """

    def __init__(self, root: str, entries: list[dict[str, Any]], shape: list[int], workers: int,
                 max_skipped: int = 0, rank: int = 0, decode: dict | None = None):
        reader = _ShardReader(root, entries, shape, skip=max_skipped > 0, decode=decode)
        self.max_skipped, self.rank, self.skipped = max_skipped, rank, 0
        if workers == 0 or not entries:
            self._items: Iterator = iter(reader)
        else:
            self._items = iter(DataLoader(reader, batch_size=None, collate_fn=as_is,
                                          num_workers=min(workers, len(entries)), prefetch_factor=2,
                                          multiprocessing_context="fork"))

    def __iter__(self) -> ShardPrefetcher:
        return self

    def __next__(self) -> tuple[str, list[str], np.ndarray]:
        item = next(self._items)
        raise_if_error(item)
        for samples, message in item["skipped"]:
            self.skipped += samples
            log.warning("skipped %d bad sample(s) (%d of %s=%d on rank %d): %s", samples, self.skipped,
                        SKIP_SETTING, self.max_skipped, self.rank, message)
            if self.skipped > self.max_skipped:
                raise DataError(f"{self.skipped} bad samples on rank {self.rank}, more than "
                                f"{SKIP_SETTING}={self.max_skipped}; the last: {message}")
        images = item["images"]
        return item["name"], item["keys"], images.numpy() if isinstance(images, torch.Tensor) else images

    def __enter__(self) -> ShardPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_workers(self._items)
