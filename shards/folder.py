"""Any folder of images (searched recursively), centre-cropped to a square and resized.

Files are taken in sorted order of their path relative to the folder. Each image is converted to grey
(1 channel) or RGB (3; transparency dropped), its largest centred square is kept and resized with an
antialiased Lanczos filter. The test split is chosen by a hash of the relative path (a file keeps its
split when others are added or removed); `test_fraction` sets its expected share.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator

from shards.common import (
    IMAGE_SUFFIXES,
    centre_square,
    check_encoding,
    check_positive,
    decode_image,
    digest_of,
    encoded,
    ordered_map,
    read_input,
    resize,
    to_channels,
    write_split,
)
from tsvae_dist import storage
from tsvae_dist.data.writer import finish_dataset
from tsvae_dist.errors import DataError

BUILDER = "folder/1"


def list_images(src: str) -> list[str]:
    """Relative paths of the image files under `src`, sorted (posix separators)."""
    fs, root = storage.filesystem(src)
    root = root.rstrip("/")
    found = []
    for path in fs.find(root):
        rel = posixpath.relpath(path, root)
        if rel.lower().endswith(IMAGE_SUFFIXES) and not posixpath.basename(rel).startswith("."):
            found.append(rel)
    if not found:
        raise DataError(f"{src}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return sorted(found)


def is_test(rel: str, test_fraction: float) -> bool:
    """Whether `rel` belongs to the test split: the first 8 hex digits of its SHA-256, as a fraction."""
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest()[:8], 16) < test_fraction * 2 ** 32


def _encode(task: tuple[str, str, int, int, str]) -> tuple[bytes, str]:
    """(encoded sample, SHA-256 of the source file) of one image; module-level so worker processes can run it."""
    src, rel, channels, resolution, encoding = task
    data = read_input(storage.join(src, *rel.split("/")))
    where = f"{src}: {rel}"
    img = to_channels(decode_image(data, where), channels, where)
    return encoded(resize(centre_square(img), resolution), encoding), hashlib.sha256(data).hexdigest()


def _keyed(split: str, rels: list[str], tasks: list, workers: int, hashes: list[str]) -> Iterator[tuple[str, bytes]]:
    for i, (rel, (sample, sha)) in enumerate(zip(rels, ordered_map(_encode, tasks, workers), strict=True)):
        hashes.append(f"{rel} {sha}")
        yield f"{split}-{i:08d}", sample


def build_folder(src: str, out: str, *, resolution: int = 64, channels: int = 3, test_fraction: float = 0.1,
                 name: str = "folder", samples_per_shard: int = 1000, workers: int = 1, encoding: str = "png") -> dict:
    """Shards of the images under `src`; returns the manifest. Key `<split>-<i>` is the i-th file of its
    split in sorted path order."""
    check_positive("folder", resolution=resolution, samples_per_shard=samples_per_shard, workers=workers)
    check_encoding("folder", encoding)
    if channels not in (1, 3):
        raise DataError(f"folder: channels: must be 1 or 3, got {channels}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"folder: test_fraction: must be in (0, 1), got {test_fraction}")
    rels = list_images(src)
    by_split = {"train": [r for r in rels if not is_test(r, test_fraction)],
                "test": [r for r in rels if is_test(r, test_fraction)]}
    splits, digests, counts = {}, {}, {}
    for split, names in by_split.items():
        if not names:
            raise DataError(f"{src}: {len(rels)} images give an empty {split} split at test_fraction={test_fraction}")
        tasks = [(src, r, channels, resolution, encoding) for r in names]
        hashes: list[str] = []
        splits[split] = write_split(out, split, _keyed(split, names, tasks, workers, hashes), samples_per_shard,
                                    ext=encoding)
        digests[split] = digest_of(hashes)
        counts[split] = len(names)
    source = {"builder": BUILDER, "dataset": name, "root": src, "files": counts, "encoding": encoding,
              "inputs_sha256": digests, "preprocess": f"{'grey' if channels == 1 else 'RGB'}, centre square, "
                                                      f"lanczos (antialiased) to {resolution}",
              "splits": f"test if sha256(path)[:8] < {test_fraction} x 2^32"}
    return finish_dataset(out, name=name, kind="image", shape=[channels, resolution, resolution], splits=splits,
                          source=source)
