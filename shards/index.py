"""Index existing WebDataset shards where they lie: write our manifest beside them, copy nothing.

Shards made by other tools (`webdataset.ShardWriter`/`TarWriter`, img2dataset, ...) hold samples as
tar members sharing a key: one image (`.jpg`, `.png`, `.npy`) plus whatever else the tool wrote
(`.cls`, `.json`, `.txt`). Indexing reads every shard once, decodes every sample's image, checks that
all have one shape, and writes `manifest.json` in the shards' directory with each shard's sample count
and SHA-256 (so readers check them as they check our own shards) and a `decode` field telling readers
which member is the image (the others are ignored) and, with `resolution`, to resize as they read
(largest centred square, Lanczos: shardformat.decode_sample). Shards whose samples differ in shape
are refused, naming the shard and the key.

Where the shards are (`url`):
- a directory whose `.tar` files are the shards: all of them form the `train` split, except the last
  `test_shards` (in sorted order), which form `test`;
- a directory whose sub-directories hold the shards (`train/`, `test/`, `val/`, ...): one split each;
- a brace pattern of one numbered range, `.../shard-{000000..000099}.tar` (webdataset's notation),
  split like a directory's files.
"""

from __future__ import annotations

import json
import posixpath
import re

from shards.common import check_positive, ordered_map
from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.errors import DataError

BUILDER = "webdataset-index/1"
_BRACE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def _expand(url: str) -> tuple[str, list[str]]:
    """(directory, shard names relative to it) of a brace pattern or a single .tar URL."""
    found = _BRACE_RE.findall(url)
    if len(found) > 1 or ("{" in url and not found):
        raise DataError(f"{url}: only one numbered range '{{000000..000099}}' is understood in a pattern")
    directory, base = url.rsplit("/", 1) if "/" in url else (".", url)
    if "{" in directory:
        raise DataError(f"{url}: the range must be in the file name, not in a directory")
    if not found:
        return directory, [base]
    lo, hi = found[0]
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    if int(hi) < int(lo):
        raise DataError(f"{url}: empty range {{{lo}..{hi}}}")
    names = [_BRACE_RE.sub(f"{i:0{width}d}", base) for i in range(int(lo), int(hi) + 1)]
    missing = [n for n in names if not storage.exists(storage.join(directory, n))]
    if missing:
        raise DataError(f"{storage.join(directory, missing[0])}: shard missing ({len(missing)} of the "
                        f"{len(names)} the pattern names)")
    return directory, names


def _tars(url: str) -> list[str]:
    """The `.tar` files directly under `url`, base names, sorted."""
    return [n for n in storage.listdir(url) if n.endswith(".tar") and not n.startswith(".")]


def find_shards(url: str, test_shards: int) -> tuple[str, dict[str, list[str]]]:
    """(dataset root, {split: shard names relative to it}) of the WebDataset shards at `url` (module doc)."""
    if url.endswith(".tar"):
        root, names = _expand(url)
    else:
        root = url.rstrip("/")
        names = _tars(root)
        if not names:
            splits = {}
            for d in storage.listdir(root):
                inner = _tars(storage.join(root, d))
                if inner:
                    if not _SPLIT_RE.match(d):
                        raise DataError(f"{storage.join(root, d)}: a split folder's name must be letters, "
                                        "digits, '_' or '-'")
                    splits[d] = [f"{d}/{n}" for n in inner]
            if not splits:
                raise DataError(f"{url}: no .tar shards in it or in its sub-directories")
            if test_shards:
                raise DataError(f"{url}: the shards are already in split folders {sorted(splits)}; "
                                "--test-shards applies to a flat folder of shards")
            return root, splits
    if test_shards >= len(names):
        raise DataError(f"{url}: --test-shards {test_shards} leaves no training shard of {len(names)}")
    splits = {"train": names[:len(names) - test_shards]}
    if test_shards:
        splits["test"] = names[len(names) - test_shards:]
    return root, splits


def _image_ext(where: str, files: dict[str, bytes], wanted: str) -> str:
    if wanted:
        if wanted not in files:
            raise DataError(f"{where}: no .{wanted} member (has {sorted(files)})")
        return wanted
    candidates = sorted(set(files) & set(shardformat.IMAGE_EXTS))
    if len(candidates) != 1:
        raise DataError(f"{where}: {len(candidates)} image members {candidates} among {sorted(files)}; "
                        f"name the image with --image-ext (one of {list(shardformat.IMAGE_EXTS)})")
    return candidates[0]


def _index_shard(task: tuple[str, str, str, int]) -> dict:
    """Read one shard, decode each sample's image: its entry, image extension, shape, other members.

    Module-level so worker processes can run it. Every sample must have the shard's first sample's
    image extension and shape; with `resolution` the resized image is decoded too.
    """
    root, name, wanted, resolution = task
    url = shardformat.shard_url(root, name)
    data = shardformat.read_shard(url)
    ext = shape = first = None
    others: set[str] = set()
    count = 0
    for key, files in shardformat.iter_tar_bytes(url, data):
        where = f"{url}: sample {key!r}"
        if ext is None:
            ext = _image_ext(where, files, wanted)
        elif ext not in files:
            raise DataError(f"{where}: no .{ext} member (has {sorted(files)}), unlike sample {first!r}")
        image = shardformat.decode_image(where, ext, files[ext])
        if shape is None:
            shape, first = list(image.shape), key
        elif list(image.shape) != shape:
            raise DataError(f"{where}: image shape [C,H,W]={list(image.shape)} differs from {shape} of sample "
                            f"{first!r}: the samples are not one shape")
        if resolution:
            shardformat.decode_sample(url, key, files, "image", [shape[0], resolution, resolution],
                                      {"image": ext, "resize_from": shape})
        others.update(e for e in files if e != ext)
        count += 1
    if count == 0:
        raise DataError(f"{url}: no samples")
    return {"entry": {"name": name, "count": count, "sha256": shardformat.sha256_hex(data)}, "ext": ext,
            "shape": shape, "first": first, "others": sorted(others)}


def index_webdataset(url: str, *, image_ext: str = "", resolution: int = 0, test_shards: int = 0,
                     name: str = "", workers: int = 1) -> dict:
    """Write the manifest of the WebDataset shards at `url` beside them; returns it."""
    check_positive("index", workers=workers)
    if image_ext and image_ext not in shardformat.IMAGE_EXTS:
        raise DataError(f"index: --image-ext {image_ext!r}: expected one of {list(shardformat.IMAGE_EXTS)}")
    if resolution < 0 or test_shards < 0:
        raise DataError("index: --resolution and --test-shards must be >= 0")
    root, by_split = find_shards(url, test_shards)
    existing = shardformat.manifest_url(root)
    if storage.exists(existing):
        try:
            old = json.loads(storage.read_text(existing))
            builder = old["source"].get("builder") or f"the builder of dataset {old['name']!r}"
        except (ValueError, KeyError, TypeError, AttributeError):
            builder = "something else"
        if builder != BUILDER:
            raise DataError(f"{existing}: a manifest written by {builder} is already there; index does not "
                            "replace it")
    tasks = [(root, n, image_ext, resolution) for split in by_split for n in by_split[split]]
    results = dict(zip((t[1] for t in tasks), ordered_map(_index_shard, tasks, workers), strict=True))
    ref = results[tasks[0][1]]
    where = lambda r: f"{shardformat.shard_url(root, r['entry']['name'])}: sample {r['first']!r}"  # noqa: E731
    for r in results.values():
        if r["ext"] != ref["ext"]:
            raise DataError(f"{where(r)}: image member .{r['ext']}, unlike .{ref['ext']} of {where(ref)}; "
                            "choose one with --image-ext")
        if r["shape"] != ref["shape"]:
            raise DataError(f"{where(r)}: image shape [C,H,W]={r['shape']} differs from {ref['shape']} of "
                            f"{where(ref)}: the samples are not one shape")
    stored = ref["shape"]
    shape = [stored[0], resolution, resolution] if resolution else stored
    decode: dict = {"image": ref["ext"]}
    if resolution and stored != shape:
        decode["resize_from"] = stored
    splits = {}
    for split, names in by_split.items():
        entries = [results[n]["entry"] for n in names]
        splits[split] = {"count": sum(e["count"] for e in entries), "shards": entries}
    others = sorted({e for r in results.values() for e in r["others"]})
    source = {"builder": BUILDER, "shards": url, "image_member": ref["ext"], "ignored_members": others,
              "stored_shape": stored,
              "resize": f"at read time: centre square, lanczos (antialiased) to {resolution}"
              if "resize_from" in decode else "none",
              "splits": (f"the last {test_shards} shard(s) in sorted order are test" if test_shards
                         else "one per folder of shards" if "/" in tasks[0][1] else "train only")}
    manifest = {"format": shardformat.FORMAT, "name": name or posixpath.basename(root.rstrip("/")) or "webdataset",
                "kind": "image", "shape": shape, "dtype": "uint8", "splits": splits, "source": source,
                "decode": decode}
    shardformat.write_manifest(root, manifest)
    return manifest
