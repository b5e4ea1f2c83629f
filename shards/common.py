"""What the dataset builders share: reading raw inputs, image preprocessing, ordered parallel encoding.

Builders never download: the user fetches the raw files, a builder reads them from a local path or
any fsspec URL. Every builder records in the manifest's `source` the SHA-256 of what it read and how
it preprocessed it, so a dataset says where it came from. Output is deterministic: samples are
written in a fixed order (parallel workers return results in input order), PNG encoding has fixed
settings, and tar members fixed metadata (tsvae_dist.data.writer); the same inputs give byte-identical shards
with the same library versions (a different zlib or JPEG decoder may change the bytes, not the
geometry).
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
from PIL import Image

from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.data.writer import ShardWriter
from tsvae_dist.errors import DataError

T = TypeVar("T")
R = TypeVar("R")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CHUNK = 64  # items per task sent to a worker process


def read_input(url: str) -> bytes:
    """The bytes of a raw input file; DataError naming it when it is missing."""
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise DataError(f"{url}: input file missing (download the raw files first; builders never download)") \
            from None


def input_record(url: str, data: bytes) -> dict:
    """The manifest's record of one raw input: its name and SHA-256."""
    return {"file": os.path.basename(url.rstrip("/")), "bytes": len(data), "sha256": shardformat.sha256_hex(data)}


def file_record(url: str) -> dict:
    """`input_record` of a possibly large file, hashed in chunks (local files are streamed)."""
    h, size = hashlib.sha256(), 0
    try:
        with storage.open_read(url) as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise DataError(f"{url}: input file missing (download the raw files first; builders never download)") \
            from None
    return {"file": os.path.basename(url.rstrip("/")), "bytes": size, "sha256": h.hexdigest()}


def decode_image(data: bytes, where: str) -> Image.Image:
    """A fully loaded PIL image; DataError naming `where` when the bytes do not decode."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for corrupt data; its messages name the buffer, not the file
        name = repr(where.rsplit(": ", 1)[-1])
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", lambda _: name, str(e))
        raise DataError(f"{where}: undecodable image ({type(e).__name__}: {message})") from e
    return img


def to_channels(img: Image.Image, channels: int, where: str = "") -> Image.Image:
    """`img` as 8-bit grey (1 channel) or RGB (3); transparency is dropped, palettes expanded.

    16-bit grey (modes I;16*, and I as Pillow opens 16-bit PNGs) is scaled to 8 bits (v >> 8): Pillow's
    own conversion clips it at 255. Other high-depth modes (float, 32-bit) are refused naming `where`.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise DataError(f"{where}: a {img.mode} image with values outside 0..65535; convert it to 8 or 16 bit")
        img = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    elif img.mode == "F":
        raise DataError(f"{where}: a floating-point ({img.mode}) image; convert it to 8 or 16 bit")
    return img.convert("L" if channels == 1 else "RGB")


def resize(img: Image.Image, size: int) -> Image.Image:
    """Square resize with Lanczos filtering. Pillow widens the filter by the scale factor when it
    shrinks, so downsampling is properly antialiased (no aliasing as with nearest/unwidened bilinear)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=None)


def centre_square(img: Image.Image) -> Image.Image:
    """The largest centred square (odd leftovers go to the right/bottom)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def encoded(img: Image.Image | np.ndarray, encoding: str) -> bytes:
    """An image's bytes in the chosen sample encoding (`shardformat.ENCODINGS`: png or npy)."""
    return shardformat.encode_image_as(np.asarray(img), encoding)


def check_encoding(name: str, encoding: str) -> None:
    if encoding not in shardformat.ENCODINGS:
        raise DataError(f"{name}: encoding: {encoding!r} is not one of {list(shardformat.ENCODINGS)}")


def ordered_map(fn: Callable[[T], R], items: list[T], workers: int) -> Iterator[R]:
    """fn(item) for every item, in input order; in `workers` processes when > 1 (fn must be picklable)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    chunk = max(1, min(_CHUNK, len(items) // (4 * workers)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # spawn: safe under threads, same everywhere
        yield from pool.imap(fn, items, chunksize=chunk)


def write_split(root_url: str, split: str, samples: Iterable[tuple[str, bytes]], samples_per_shard: int,
                ext: str = "png") -> dict:
    """Write (key, encoded image) pairs as the shards of `split`; the split's manifest entry."""
    with ShardWriter(root_url, split, samples_per_shard) as writer:
        for key, data in samples:
            writer.add(key, {ext: data})
    entry = writer.close()
    if entry["count"] == 0:
        raise DataError(f"{root_url}: split {split!r} has no samples")
    return entry


def digest_of(records: Iterable[str]) -> str:
    """SHA-256 over lines (e.g. one per input file), for a compact provenance record."""
    h = hashlib.sha256()
    for line in records:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def check_positive(name: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{name}: {key}: expected a positive integer, got {value!r}")

