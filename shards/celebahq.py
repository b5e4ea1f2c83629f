"""CelebA-HQ (Karras et al. 2018: 30,000 aligned faces) from a folder of its images, resized.

Input: the 30,000 images as commonly distributed, one file each, PNG or JPEG, square, all one size
(1024 px as released; 512 or 256 px as resized copies are), numbered 0-29999 in the file name:
`0.jpg` ... `29999.jpg` (CelebAMask-HQ's `CelebA-HQ-img/`), `00000.png` ... (resized sets),
`imgHQ00000.png` ... (the original dataset tool's). The image number is the sample's identity.

Each image is resized with a Lanczos filter, antialiased when shrinking (shards.common.resize), to
`resolution`, never up.

Splits: CelebA-HQ has no official split. Two deterministic ones are offered:
- `index` (default): images 0-26999 train, 27000-29999 test: the 27,000 / 3,000 split of Glow
  (Kingma & Dhariwal 2018) and later likelihood models. Identities can appear in both splits.
- `celeba`, with `--mapping CelebA-HQ-to-CelebA-mapping.txt` (shipped with CelebAMask-HQ): each
  image keeps its CelebA source image's official partition (train / val / test by image number,
  identity-disjoint): 24,183 / 2,993 / 2,824 images.
The manifest's `source.splits` records which was used.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

from shards.celeba import official_split
from shards.common import (
    check_encoding,
    check_positive,
    decode_image,
    digest_of,
    encoded,
    input_record,
    ordered_map,
    read_input,
    resize,
    write_split,
)
from tsvae_dist import storage
from tsvae_dist.data.writer import finish_dataset
from tsvae_dist.errors import DataError

BUILDER = "celebahq/1"
IMAGES = 30000
TRAIN_BY_INDEX = 27000  # the `index` split: images below this number train, the rest test
RESOLUTIONS = (32, 64, 128, 256, 512, 1024)
SPLITS = ("index", "celeba")
_NAME_RE = re.compile(r"^(?:imgHQ)?(\d{1,5})\.(png|jpg|jpeg)$", re.IGNORECASE)


def list_images(src: str) -> dict[int, str]:
    """{image number: file name} of the CelebA-HQ images directly in the folder `src`."""
    found: dict[int, str] = {}
    for name in storage.listdir(src):
        m = _NAME_RE.match(name)
        if m is None:
            continue
        number = int(m.group(1))
        if number >= IMAGES:
            raise DataError(f"{storage.join(src, name)}: image number {number}; CelebA-HQ numbers its "
                            f"{IMAGES} images 0-{IMAGES - 1}")
        if number in found:
            raise DataError(f"{src}: image {number} twice ({found[number]} and {name})")
        found[number] = name
    if not found:
        raise DataError(f"{src}: no CelebA-HQ images found (files named <number>.png or .jpg, 0-{IMAGES - 1}, "
                        "as in CelebA-HQ-img/, or imgHQ<number>.png)")
    return found


def parse_mapping(text: str, where: str) -> dict[int, int]:
    """{CelebA-HQ image number: CelebA image number} of CelebA-HQ-to-CelebA-mapping.txt
    (a header line `idx orig_idx orig_file`, then e.g. `0 119613 119614.jpg`)."""
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or (i == 1 and parts[0] == "idx"):
            continue
        if len(parts) != 3 or not parts[0].isdigit() or re.fullmatch(r"\d{6}\.jpg", parts[2]) is None:
            raise DataError(f"{where}: line {i}: expected '<idx> <orig_idx> <NNNNNN>.jpg', got {line.strip()!r}")
        out[int(parts[0])] = int(parts[2][:6])
    return out


def _encode(task: tuple[str, str, int, str]) -> tuple[bytes, str, int]:
    """(encoded sample, SHA-256 of the source file, its side) of one image; module-level for worker processes."""
    src, name, resolution, encoding = task
    data = read_input(storage.join(src, name))
    where = f"{src}: {name}"
    img = decode_image(data, where).convert("RGB")
    w, h = img.size
    if w != h:
        raise DataError(f"{where}: {w}x{h} pixels; CelebA-HQ images are square")
    if w < resolution:
        raise DataError(f"{where}: {w} px is smaller than --resolution {resolution}; this builder never upsamples")
    return encoded(resize(img, resolution), encoding), hashlib.sha256(data).hexdigest(), w


def _keyed(split: str, numbers: list[int], tasks: list, workers: int, hashes: list[str], sides: set[int]
           ) -> Iterator[tuple[str, bytes]]:
    for number, task, (sample, sha, side) in zip(numbers, tasks, ordered_map(_encode, tasks, workers), strict=True):
        if sides and side not in sides:
            raise DataError(f"{task[0]}: {task[1]}: {side} px, unlike the {sides.pop()} px of the images before it; "
                            "the folder must hold one size")
        sides.add(side)
        hashes.append(f"{task[1]} {sha}")
        yield f"{split}-{number:05d}", sample


def build_celebahq(src: str, out: str, *, resolution: int = 256, split: str = "index", mapping: str = "",
                   expect_images: int = IMAGES, samples_per_shard: int = 1000, workers: int = 1,
                   encoding: str = "png") -> dict:
    """Shards of CelebA-HQ at `resolution` from the folder `src`; returns the manifest.

    The folder must hold `expect_images` images (all 30,000 unless told otherwise, so a partial
    download is not silently a smaller dataset).
    """
    check_positive("celebahq", expect_images=expect_images, samples_per_shard=samples_per_shard, workers=workers)
    check_encoding("celebahq", encoding)
    if resolution not in RESOLUTIONS:
        raise DataError(f"celebahq: resolution: {resolution} is not one of {RESOLUTIONS}")
    if split not in SPLITS:
        raise DataError(f"celebahq: split: {split!r} is not one of {SPLITS}")
    if (split == "celeba") != bool(mapping):
        raise DataError("celebahq: --split celeba needs --mapping CelebA-HQ-to-CelebA-mapping.txt (and only it)")
    images = list_images(src)
    if len(images) != expect_images:
        missing = next((n for n in range(IMAGES) if n not in images), None)
        raise DataError(f"{src}: {len(images)} CelebA-HQ images, expected {expect_images}"
                        + (f" (first missing: image {missing})" if missing is not None else ""))
    inputs = []
    if split == "celeba":
        data = read_input(mapping)
        inputs.append(input_record(mapping, data))
        to_celeba = parse_mapping(data.decode("utf-8", errors="replace"), mapping)
        unmapped = sorted(set(images) - set(to_celeba))
        if unmapped:
            raise DataError(f"{mapping}: no line for {len(unmapped)} image(s) of {src} (first: {unmapped[0]})")
        split_of = {n: official_split(to_celeba[n]) for n in images}
        how = "CelebA's official partition of each image's source (CelebA-HQ-to-CelebA-mapping.txt)"
    else:
        split_of = {n: "train" if n < TRAIN_BY_INDEX else "test" for n in images}
        how = f"by image number: 0-{TRAIN_BY_INDEX - 1} train, {TRAIN_BY_INDEX}-{IMAGES - 1} test (Glow's 27,000/3,000)"
    splits, sides = {}, set()
    for name in ("train", "val", "test"):
        numbers = sorted(n for n in images if split_of[n] == name)
        if not numbers:
            if name == "val":
                continue
            raise DataError(f"{src}: no {name} images under the {split!r} split")
        tasks = [(src, images[n], resolution, encoding) for n in numbers]
        hashes: list[str] = []
        splits[name] = write_split(out, name, _keyed(name, numbers, tasks, workers, hashes, sides),
                                   samples_per_shard, ext=encoding)
        inputs.append({"file": f"{name}: {len(numbers)} image files", "sha256_of_list": digest_of(hashes)})
    source = {"builder": BUILDER, "dataset": "celebahq", "inputs": inputs, "source_side": sides.pop(),
              "resize": "lanczos (antialiased)", "splits": how, "encoding": encoding}
    return finish_dataset(out, name=f"celebahq{resolution}", kind="image", shape=[3, resolution, resolution],
                          splits=splits, source=source)
