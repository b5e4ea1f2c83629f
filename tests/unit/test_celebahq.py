"""The CelebA-HQ builder on small folders made here; the aligned-CelebA builder's refusal to upsample;
the presets' expected sources."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main as shards_cli
from shards.celeba import build_celeba
from shards.celebahq import build_celebahq
from tests.datautil import split_images
from tsvae_dist.cli import compose
from tsvae_dist.data.datasets import ensure_dataset
from tsvae_dist.errors import ConfigError, DataError

NUMBERS = [0, 1, 2, 3, 26998, 26999, 27000, 27001, 29999]  # 6 train, 3 test under the index split


def _hq(number: int, side: int) -> np.ndarray:
    """A smooth side x side face stand-in (cheap to encode at 1024 px), different per image number."""
    rng = np.random.default_rng(number)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC))


def _folder(root: Path, side: int, fmt: str, name: str, numbers: list[int] = NUMBERS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.fromarray(_hq(n, side)).save(root / name.format(n), format=fmt, **({"quality": 92} if fmt == "JPEG"
                                                                                 else {}))
    (root / "README.txt").write_text("not an image")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lanczos(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.LANCZOS, reducing_gap=None)
                          ).transpose(2, 0, 1)


@pytest.mark.parametrize("side, fmt, name, resolution", [
    (1024, "JPEG", "{}.jpg", 256),  # CelebAMask-HQ's CelebA-HQ-img/: 0.jpg ... 29999.jpg, 1024 px
    (256, "PNG", "imgHQ{:05d}.png", 128),  # a resized 256-px copy, the dataset tool's names
])
def test_celebahq_split_pixels_and_byte_identical_reruns(tmp_path, side, fmt, name, resolution):
    src = _folder(tmp_path / "src", side, fmt, name)
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["celebahq", "--src", str(src), "--resolution", str(resolution), "--expect-images", str(len(NUMBERS)),
            "--samples-per-shard", "4"]
    assert shards_cli([*args, "--out", str(a)]) == 0
    assert shards_cli([*args, "--out", str(b), "--workers", "2"]) == 0
    assert _tree(a) == _tree(b)
    m = build_celebahq(str(src), str(tmp_path / "c"), resolution=resolution, expect_images=len(NUMBERS),
                       samples_per_shard=4)
    assert m["name"] == f"celebahq{resolution}" and m["shape"] == [3, resolution, resolution]
    assert m["source"]["dataset"] == "celebahq" and m["source"]["source_side"] == side
    assert "27,000/3,000" in m["source"]["splits"]
    train, test = split_images(str(a), "train"), split_images(str(a), "test")
    assert sorted(train) == [f"train-{n:05d}" for n in NUMBERS[:6]]
    assert sorted(test) == [f"test-{n:05d}" for n in NUMBERS[6:]]
    for key, image in {**train, **test}.items():
        assert np.array_equal(image, _lanczos(src / name.format(int(key.split("-")[1])), resolution)), key


def test_celebahq_split_by_celeba_partition_through_the_mapping(tmp_path):
    src = _folder(tmp_path / "src", 64, "JPEG", "{}.jpg")
    mapping = tmp_path / "CelebA-HQ-to-CelebA-mapping.txt"
    celeba = {0: 5, 1: 162770, 2: 162771, 3: 182637, 26998: 182638, 26999: 202599, 27000: 7, 27001: 8, 29999: 9}
    mapping.write_text("idx         orig_idx        orig_file\n"
                       + "".join(f"{n}\t{c - 1}\t{c:06d}.jpg\n" for n, c in celeba.items()))
    m = build_celebahq(str(src), str(tmp_path / "out"), resolution=32, split="celeba", mapping=str(mapping),
                       expect_images=len(NUMBERS))
    assert {s: e["count"] for s, e in m["splits"].items()} == {"train": 5, "val": 2, "test": 2}
    assert sorted(split_images(str(tmp_path / "out"), "val")) == ["val-00002", "val-00003"]
    assert m["source"]["inputs"][0]["file"] == "CelebA-HQ-to-CelebA-mapping.txt"
    mapping.write_text("idx orig_idx orig_file\n0 4 000005.jpg\n")
    with pytest.raises(DataError, match=r"mapping.txt: no line for 8 image\(s\) .* \(first: 1\)"):
        build_celebahq(str(src), str(tmp_path / "x"), resolution=32, split="celeba", mapping=str(mapping),
                       expect_images=len(NUMBERS))


def test_celebahq_refusals_name_the_file(tmp_path):
    src = _folder(tmp_path / "src", 64, "PNG", "{}.png")
    with pytest.raises(DataError, match=r"src: 9 CelebA-HQ images, expected 30000 \(first missing: image 4\)"):
        build_celebahq(str(src), str(tmp_path / "o1"), resolution=32)
    with pytest.raises(DataError, match=r"0.png: 64 px is smaller than --resolution 128; .* never upsamples"):
        build_celebahq(str(src), str(tmp_path / "o2"), resolution=128, expect_images=9)
    Image.fromarray(_hq(5, 64)[:, :60]).save(src / "5.png")
    with pytest.raises(DataError, match=r"5.png: 60x64 pixels; CelebA-HQ images are square"):
        build_celebahq(str(src), str(tmp_path / "o3"), resolution=32, expect_images=10)
    Image.fromarray(_hq(5, 48)).save(src / "5.png")
    with pytest.raises(DataError, match=r"5.png: 48 px, unlike the 64 px of the images before it"):
        build_celebahq(str(src), str(tmp_path / "o4"), resolution=32, expect_images=10)
    Image.fromarray(_hq(5, 64)).save(src / "00005.jpg")
    with pytest.raises(DataError, match=r"image 5 twice \(00005.jpg and 5.png\)"):
        build_celebahq(str(src), str(tmp_path / "o5"), resolution=32, expect_images=11)
    os.remove(src / "00005.jpg")
    Image.fromarray(_hq(5, 64)).save(src / "30000.png")
    with pytest.raises(DataError, match=r"30000.png: image number 30000"):
        build_celebahq(str(src), str(tmp_path / "o6"), resolution=32, expect_images=11)
    for out in ("o1", "o2", "o3", "o4", "o5", "o6"):
        assert not (tmp_path / out / "manifest.json").exists()


def test_aligned_celeba_refuses_to_upsample_unless_asked(tmp_path):
    src = tmp_path / "img_align_celeba"
    src.mkdir()
    rng = np.random.default_rng(0)
    for n in (1, 2, 182638):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (src / f"{n:06d}.jpg").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="256 px is above the 128 px crop.*python -m shards celebahq.*--upsample"):
        build_celeba(str(src), str(tmp_path / "a"), resolution=256)
    assert shards_cli(["celeba", "--src", str(src), "--out", str(tmp_path / "b"), "--resolution", "256"]) == 2
    m = build_celeba(str(src), str(tmp_path / "c"), resolution=256, upsample=True)
    assert m["shape"] == [3, 256, 256] and "upsampled 128 -> 256" in m["source"]["resize"]
    assert build_celeba(str(src), str(tmp_path / "d"), resolution=128, crop=140)["shape"] == [3, 128, 128]


def test_presets_name_their_source_and_refuse_another(tmp_path):
    for preset, source, res in (("celeba64", "celeba", 64), ("celeba128", "celeba", 128),
                                ("celeba256", "celebahq", 256), ("celebahq128", "celebahq", 128)):
        cfg = compose([f"dataset={preset}"])
        assert (cfg.dataset.source, cfg.dataset.resolution) == (source, res), preset
    src = _folder(tmp_path / "src", 64, "PNG", "{}.png")
    hq = str(tmp_path / "hq")
    build_celebahq(str(src), hq, resolution=32, expect_images=9)
    cfg = compose(["dataset=celebahq128", "dataset.resolution=32"])
    assert ensure_dataset(cfg.dataset, hq)["name"] == "celebahq32"
    wrong = compose(["dataset=celeba64", "dataset.resolution=32"])
    with pytest.raises(ConfigError, match=r"dataset.source: the celeba64 preset expects shards built from 'celeba', "
                                          r"but .* was built from 'celebahq'.*python -m shards celeba "):
        ensure_dataset(wrong.dataset, hq)
    any_source = compose(["dataset=celeba64", "dataset.resolution=32", "dataset.source="])
    assert ensure_dataset(any_source.dataset, hq)["name"] == "celebahq32"
    with pytest.raises(DataError, match=r"python -m shards celebahq --src <downloaded files> --out .* "
                                        r"--resolution 256"):
        ensure_dataset(compose(["dataset=celeba256"]).dataset, str(tmp_path / "nothing"))
