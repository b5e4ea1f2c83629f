"""Deterministic shard writing: the same samples give byte-identical tar files and manifest.

Tar members carry fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644, ustar
format) and are sorted by (key, extension), which keeps each sample's members adjacent. Each shard
is written with one atomic write; the manifest, written last by `finish_dataset`, marks the dataset
complete.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable

from tsvae_dist import storage
from tsvae_dist.data import shardformat


def shard_name(split: str, index: int) -> str:
    """The name of shard `index` of `split`, relative to the dataset root (`train/shard-000003.tar`)."""
    return f"{split}/shard-{index:06d}.tar"


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A deterministic tar of samples (key, {ext: bytes}); keys unique and valid (`shardformat.KEY_RE`)."""
    members: list[tuple[str, str, bytes]] = []
    keys: set[str] = set()
    for key, files in samples:
        if not shardformat.KEY_RE.match(key):
            raise ValueError(f"tar_bytes: bad sample key {key!r} ('/'-separated letters, digits, '_' and '-')")
        if key in keys:
            raise ValueError(f"tar_bytes: duplicate sample key {key!r}")
        if not files:
            raise ValueError(f"tar_bytes: sample {key!r} has no files")
        keys.add(key)
        for ext, data in files.items():
            if not shardformat.EXT_RE.match(ext):
                raise ValueError(f"tar_bytes: sample {key!r}: bad extension {ext!r}")
            members.append((key, ext, bytes(data)))
    members.sort(key=lambda m: (m[0], m[1]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(shard_url: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Write one shard atomically at `shard_url`; returns (sample count, sha256 hex) for its manifest entry.

    Used directly by jobs that write one output shard per input shard (encoding), where the shard
    name is fixed by the input rather than by a running counter.
    """
    samples = list(samples)
    data = tar_bytes(samples)
    storage.write_bytes_atomic(shard_url, data)
    return len(samples), shardformat.sha256_hex(data)


def shard_entry(root_url: str, name: str) -> dict:
    """The manifest entry of an existing shard, recomputed from its bytes (e.g. after a resumed job)."""
    url = shardformat.shard_url(root_url, name)
    data = shardformat.read_shard(url)
    count = sum(1 for _ in shardformat.iter_tar_bytes(url, data))
    return {"name": name, "count": count, "sha256": shardformat.sha256_hex(data)}


class ShardWriter:
    """Writes the samples of one split into numbered shards of `samples_per_shard` samples each.

    Usage: `add(key, files)` per sample, then `close()`, which flushes the last (possibly short) shard
    and returns the split's manifest entry {"count", "shards": [{"name", "count", "sha256"}, ...]}.
    Also a context manager; `close()` is not called when the block raises, so no partial shard list
    escapes.
    """

    def __init__(self, root_url: str, split: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"ShardWriter: samples_per_shard must be >= 1, got {samples_per_shard}")
        self.root_url = root_url
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._pending: list[tuple[str, dict[str, bytes]]] = []
        self._closed = False

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Queue one sample; a full shard is written as soon as it is complete."""
        if self._closed:
            raise RuntimeError("ShardWriter: add() after close()")
        self._pending.append((key, files))
        if len(self._pending) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            name = shard_name(self.split, len(self.shards))
            count, sha256 = write_shard(shardformat.shard_url(self.root_url, name), self._pending)
            self.shards.append({"name": name, "count": count, "sha256": sha256})
            self._pending = []

    def close(self) -> dict:
        """Write the last shard; the split's manifest entry."""
        if not self._closed:
            self._flush()
            self._closed = True
        return {"count": sum(s["count"] for s in self.shards), "shards": list(self.shards)}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def finish_dataset(root_url: str, *, name: str, kind: str, shape: list[int], splits: dict[str, dict],
                   source: dict, **extras: object) -> dict:
    """Assemble, validate and write the manifest (last: it marks the dataset complete); returns it.

    `splits` maps split name to the entry `ShardWriter.close()` returned; `extras` become top-level
    manifest fields (e.g. `intrinsic_dim`, `encoder`).
    """
    manifest = {"format": shardformat.FORMAT, "name": name, "kind": kind, "shape": list(shape),
                "dtype": shardformat.KINDS.get(kind, "?"), "splits": splits, "source": source}
    for key, value in extras.items():
        if key in manifest:
            raise ValueError(f"finish_dataset: extra field {key!r} clashes with a standard field")
        manifest[key] = value
    shardformat.write_manifest(root_url, manifest)
    return manifest
