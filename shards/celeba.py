"""CelebA from the aligned images (`img_align_celeba/` or `img_align_celeba.zip`), cropped and resized.

Geometry: each aligned image is 178×218 (W×H). The paper's crop keeps rows 45:173 and columns 25:153
(a 128×128 square centred on the face); `crop=140` keeps the 140×140 centre square (rows 39:179,
columns 19:159) instead. The crop is then resized to 64, 128 or 256 pixels with a Lanczos filter,
antialiased when shrinking (shards.common.resize). A size above the crop would only upsample it (4x
the pixels of 128 at 256, no new information) and is refused unless `upsample` is asked for: a
256-pixel CelebA is CelebA-HQ (shards/celebahq.py).

Splits: the official partition (`list_eval_partition.txt`: 0 train, 1 val, 2 test) when given;
otherwise the same partition by image number (1-162770 train, 162771-182637 val, the rest test),
which is what that file says.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Iterator

from PIL import Image

from shards.common import (
    check_encoding,
    check_positive,
    decode_image,
    digest_of,
    encoded,
    file_record,
    input_record,
    ordered_map,
    read_input,
    resize,
    write_split,
)
from tsvae_dist import storage
from tsvae_dist.data.writer import finish_dataset
from tsvae_dist.errors import DataError

BUILDER = "celeba-aligned/1"
ALIGNED_SIZE = (178, 218)  # (width, height) of img_align_celeba images
CROPS = {128: (45, 25), 140: (39, 19)}  # crop side -> (top row, left column)
RESOLUTIONS = (64, 128, 256)
OFFICIAL_SPLIT_ENDS = ((162770, "train"), (182637, "val"))  # last image number of each split; then test
PARTITION_CODES = {"0": "train", "1": "val", "2": "test"}
_NAME_RE = re.compile(r"^(\d{6})\.jpg$")


def crop_box(crop: int) -> tuple[int, int, int, int]:
    """PIL's (left, top, right, bottom) of a crop of side `crop` (128: the paper's rows 45:173, cols 25:153)."""
    if crop not in CROPS:
        raise DataError(f"celeba: crop: {crop} is not one of {sorted(CROPS)}")
    top, left = CROPS[crop]
    return left, top, left + crop, top + crop


def official_split(number: int) -> str:
    for last, split in OFFICIAL_SPLIT_ENDS:
        if number <= last:
            return split
    return "test"


def parse_partition(text: str, where: str) -> dict[str, str]:
    """{file name: split} of list_eval_partition.txt."""
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in PARTITION_CODES or not _NAME_RE.match(parts[0]):
            raise DataError(f"{where}: line {i}: expected '<NNNNNN>.jpg <0|1|2>', got {line.strip()!r}")
        out[parts[0]] = PARTITION_CODES[parts[1]]
    return out


def preprocess(data: bytes, where: str, crop: int, resolution: int) -> Image.Image:
    """The paper's crop of one aligned image, resized to `resolution` (RGB)."""
    img = decode_image(data, where).convert("RGB")
    if img.size != ALIGNED_SIZE:
        raise DataError(f"{where}: {img.size[0]}x{img.size[1]} pixels; aligned CelebA images are "
                        f"{ALIGNED_SIZE[0]}x{ALIGNED_SIZE[1]} (img_align_celeba)")
    return resize(img.crop(crop_box(crop)), resolution)


_ZIPS: dict[str, zipfile.ZipFile] = {}  # per process: each worker opens the archive once


def _read_member(src: str, name: str) -> bytes:
    if src.endswith(".zip"):
        if src not in _ZIPS:
            _ZIPS[src] = zipfile.ZipFile(storage.open_read(src))
        return _ZIPS[src].read(_ZIPS[src].getinfo(name))
    return read_input(storage.join(src, name))


def _encode(task: tuple[str, str, int, int, str]) -> tuple[bytes, str]:
    """(encoded sample, SHA-256 of the source JPEG) of one image; module-level so worker processes can run it."""
    src, name, crop, resolution, encoding = task
    data = _read_member(src, name)
    return encoded(preprocess(data, f"{src}: {name}", crop, resolution), encoding), hashlib.sha256(data).hexdigest()


def _keyed(split: str, names: list[str], tasks: list, workers: int, hashes: list[str]
           ) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image) of each image in order; appends "<name> <sha256 of the JPEG>" to `hashes`."""
    for name, (sample, sha) in zip(names, ordered_map(_encode, tasks, workers), strict=True):
        hashes.append(f"{name} {sha}")
        yield f"{split}-{name[:6]}", sample


def _list_images(src: str) -> dict[str, str]:
    """{file name (NNNNNN.jpg): name inside src} of the aligned images in the folder or zip."""
    if src.endswith(".zip"):
        try:
            with zipfile.ZipFile(storage.open_read(src)) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise DataError(f"{src}: not a readable zip ({e})") from e
    else:
        names = storage.listdir(src)
    found = {}
    for member in names:
        base = member.rsplit("/", 1)[-1]
        if _NAME_RE.match(base):
            found[base] = member
    if not found:
        raise DataError(f"{src}: no aligned CelebA images (NNNNNN.jpg) found")
    return found


def build_celeba(src: str, out: str, *, resolution: int = 64, crop: int = 128, partition: str = "",
                 samples_per_shard: int = 1000, workers: int = 1, encoding: str = "png", upsample: bool = False
                 ) -> dict:
    """Shards of CelebA at `resolution` from `src` (folder or zip); returns the manifest."""
    check_positive("celeba", samples_per_shard=samples_per_shard, workers=workers)
    check_encoding("celeba", encoding)
    if resolution not in RESOLUTIONS:
        raise DataError(f"celeba: resolution: {resolution} is not one of {RESOLUTIONS}")
    crop_box(crop)
    if resolution > crop and not upsample:
        raise DataError(f"celeba: resolution: {resolution} px is above the {crop} px crop: that only upsamples it. "
                        f"For 256-px faces build CelebA-HQ (`python -m shards celebahq`); pass --upsample to "
                        "upsample anyway")
    images = _list_images(src)
    inputs = []
    if partition:
        data = read_input(partition)
        inputs.append(input_record(partition, data))
        split_of = parse_partition(data.decode("utf-8", errors="replace"), partition)
        missing = sorted(set(split_of) - set(images))
        unlisted = sorted(set(images) - set(split_of))
        if missing or unlisted:
            raise DataError(f"{partition}: lists {len(missing)} image(s) absent from {src} (first: "
                            f"{(missing or ['-'])[0]}) and omits {len(unlisted)} present there "
                            f"(first: {(unlisted or ['-'])[0]})")
    else:
        split_of = {name: official_split(int(name[:6])) for name in images}
    if src.endswith(".zip"):
        inputs.append(file_record(src))
    splits = {}
    for split in ("train", "val", "test"):
        names = sorted(n for n in images if split_of[n] == split)
        if not names:
            if split == "val":
                continue
            raise DataError(f"{src}: no {split} images under the {'given' if partition else 'official'} partition")
        tasks = [(src, images[n], crop, resolution, encoding) for n in names]
        hashes: list[str] = []
        splits[split] = write_split(out, split, _keyed(split, names, tasks, workers, hashes), samples_per_shard,
                                    ext=encoding)
        if not src.endswith(".zip"):
            inputs.append({"file": f"{split}: {len(names)} jpg files", "sha256_of_list": digest_of(hashes)})
    left, top, right, bottom = crop_box(crop)
    source = {"builder": BUILDER, "dataset": "celeba", "inputs": inputs, "encoding": encoding,
              "crop": {"rows": [top, bottom], "cols": [left, right]},
              "resize": "lanczos (antialiased)" + (f", upsampled {crop} -> {resolution}" if resolution > crop else ""),
              "splits": "list_eval_partition.txt" if partition else "official partition by image number"}
    return finish_dataset(out, name=f"celeba{resolution}", kind="image", shape=[3, resolution, resolution],
                          splits=splits, source=source)
