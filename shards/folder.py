"""Any folder of images (searched recursively), centre-cropped to a square and resized.

Files are taken in sorted order of their path relative to the folder. Each image is converted to grey
(1 channel) or RGB (3; transparency dropped), its largest centred square is kept and resized with an
antialiased Lanczos filter.

The split: when the folder has a `train/` subfolder and a `test/` one (or, without `test/`, `val/`,
`valid/` or `validation/`), those are the splits, as the dataset gives them; images anywhere else are
refused (naming one), and a validation folder beside `test/` is left out (counted in the manifest).
Otherwise the test split is chosen by a hash of the relative path (a file keeps its split when others
are added or removed), `test_fraction` (default 0.1) setting its expected share. The manifest's
`source.split` says which (`folders` or `hash`).
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
DEFAULT_TEST_FRACTION = 0.1
TEST_FOLDERS = ("test", "val", "valid", "validation")  # the first present is the test split, beside train/


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


def split_folders(rels: list[str]) -> tuple[str, str] | None:
    """(train folder, test folder) when the images come in given split folders, else None."""
    tops = {r.split("/", 1)[0] for r in rels if "/" in r}
    if "train" not in tops:
        return None
    test = next((t for t in TEST_FOLDERS if t in tops), None)
    return ("train", test) if test else None


def _split(src: str, rels: list[str], test_fraction: float | None) -> tuple[dict[str, list[str]], dict]:
    """The images of each split and how they were split (the manifest's record)."""
    folders = split_folders(rels)
    if folders is None:
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        if not 0.0 < fraction < 1.0:
            raise DataError(f"folder: test_fraction: must be in (0, 1), got {fraction}")
        by_split = {"train": [r for r in rels if not is_test(r, fraction)],
                    "test": [r for r in rels if is_test(r, fraction)]}
        return by_split, {"split": "hash", "test_fraction": fraction,
                          "splits": f"test if sha256(path)[:8] < {fraction} x 2^32"}
    train, test = folders
    if test_fraction is not None:
        raise DataError(f"folder: test_fraction: {src} has {train}/ and {test}/ subfolders, whose split is used; "
                        "drop --test-fraction (or move the images out of the split folders to split by hash)")
    by_split = {"train": [r for r in rels if r.startswith(f"{train}/")],
                "test": [r for r in rels if r.startswith(f"{test}/")]}
    left_out = [t for t in TEST_FOLDERS if t != test]
    stray = [r for r in rels if r.split("/", 1)[0] not in (train, test, *left_out) or "/" not in r]
    if stray:
        raise DataError(f"{src}: {len(stray)} images outside its {train}/ and {test}/ split folders (e.g. "
                        f"{stray[0]!r}); move them into one of the two")
    ignored = {t: sum(r.startswith(f"{t}/") for r in rels) for t in left_out}
    return by_split, {"split": "folders", "splits": f"folders {train}/ and {test}/",
                      "ignored": {f"{t}/": n for t, n in ignored.items() if n}}


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


def build_folder(src: str, out: str, *, resolution: int = 64, channels: int = 3, test_fraction: float | None = None,
                 name: str = "folder", samples_per_shard: int = 1000, workers: int = 1, encoding: str = "png") -> dict:
    """Shards of the images under `src`; returns the manifest. Key `<split>-<i>` is the i-th file of its
    split in sorted path order. `test_fraction` (hash split) only applies without split folders."""
    check_positive("folder", resolution=resolution, samples_per_shard=samples_per_shard, workers=workers)
    check_encoding("folder", encoding)
    if channels not in (1, 3):
        raise DataError(f"folder: channels: must be 1 or 3, got {channels}")
    rels = list_images(src)
    by_split, how = _split(src, rels, test_fraction)
    splits, digests, counts = {}, {}, {}
    for split, names in by_split.items():
        if not names:
            raise DataError(f"{src}: {len(rels)} images give an empty {split} split ({how['splits']})")
        tasks = [(src, r, channels, resolution, encoding) for r in names]
        hashes: list[str] = []
        splits[split] = write_split(out, split, _keyed(split, names, tasks, workers, hashes), samples_per_shard,
                                    ext=encoding)
        digests[split] = digest_of(hashes)
        counts[split] = len(names)
    source = {"builder": BUILDER, "dataset": name, "root": src, "files": counts, "encoding": encoding,
              "inputs_sha256": digests, "preprocess": f"{'grey' if channels == 1 else 'RGB'}, centre square, "
                                                      f"lanczos (antialiased) to {resolution}",
              **how}
    return finish_dataset(out, name=name, kind="image", shape=[channels, resolution, resolution], splits=splits,
                          source=source)
