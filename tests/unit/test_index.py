"""`python -m shards index`: WebDataset shards written by webdataset's own writers, indexed where they lie."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.__main__ import main as shards_main
from shards.index import index_webdataset
from tests.datautil import build_images, split_images
from tsvae_dist.data import shardformat
from tsvae_dist.data.loader import LoaderConfig, StreamLoader
from tsvae_dist.errors import DataError


def _image(i: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.ascontiguousarray(base)


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_wds(pattern: str, n: int, *, fmt: str = "JPEG", ext: str = "jpg", per_shard: int = 5,
              h: int = 20, w: int = 24, odd: int | None = None) -> dict[str, bytes]:
    """`n` samples through webdataset.ShardWriter, with the members tools write besides the image;
    sample `odd` (if given) is 2 pixels narrower. Returns {key: image bytes}."""
    out = {}
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            key = f"sample{i:05d}"
            data = _encoded(_image(i, h, w - 2 if i == odd else w), fmt)
            sink.write({"__key__": key, ext: data, "cls": str(i % 3).encode(), "json": json.dumps({"i": i}).encode()})
            out[key] = data
    return out


def _pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def test_shardwriter_jpegs_indexed_in_place_and_read_by_every_reader(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    images = write_wds(str(src / "part-%06d.tar"), 23)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    m = index_webdataset(str(src), test_shards=1)
    # no copy: the shards are untouched, the manifest lies beside them
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.name != "manifest.json"} == before
    assert m["shape"] == [3, 20, 24] and m["decode"] == {"image": "jpg"}
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == [f"part-00000{i}.tar" for i in range(4)]
    assert m["splits"]["test"]["count"] == 3 and m["splits"]["train"]["count"] == 20
    assert m["source"]["ignored_members"] == ["cls", "json"]
    got = {**split_images(str(src), "train"), **split_images(str(src), "test")}
    assert got.keys() == images.keys()
    for key, data in images.items():
        assert np.array_equal(got[key], _pil(data)), key
    assert shards_main(["verify", str(src)]) == 0
    # re-indexing gives the same bytes
    first = (src / "manifest.json").read_bytes()
    index_webdataset(str(src), test_shards=1, workers=2)  # shards read in 2 processes
    assert (src / "manifest.json").read_bytes() == first


def test_resolution_resizes_at_read_time_in_loader_and_prefetcher(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    images = write_wds(str(src / "s-%03d.tar"), 8, fmt="PNG", ext="png", per_shard=4, h=30, w=40)
    assert shards_main(["index", str(src), "--resolution", "16", "--test-shards", "1"]) == 0
    m = shardformat.read_manifest(str(src))
    assert m["shape"] == [3, 16, 16] and m["decode"] == {"image": "png", "resize_from": [3, 30, 40]}
    want = {}
    for key, data in images.items():
        with Image.open(io.BytesIO(data)) as img:
            want[key] = np.asarray(shardformat.resize_square(img.convert("RGB"), 16)).transpose(2, 0, 1)
    # centre square then Lanczos: not a plain squash of the 40x30 image
    with Image.open(io.BytesIO(images["sample00000"])) as img:
        squash = np.asarray(img.resize((16, 16), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert not np.array_equal(want["sample00000"], squash)
    assert all(np.array_equal(v, want[k]) for k, v in split_images(str(src), "train").items())
    loader = StreamLoader(str(src), "train", global_batch=4, rank=0, world=1,
                          cfg=LoaderConfig(workers=0, streams=1, shuffle_buffer=0), seed=0)
    batch = next(iter(loader.epoch(0)))
    assert batch["image"].shape == (4, 3, 16, 16)
    for key, image in zip(batch["key"], batch["image"], strict=True):
        assert np.array_equal(image.numpy(), want[key])  # the bytes, scaled on the device later


def test_split_folders_and_brace_patterns(tmp_path: Path):
    src = tmp_path / "wds"
    for split, n in (("train", 9), ("test", 4)):
        (src / split).mkdir(parents=True)
        write_wds(str(src / split / "shard-%06d.tar"), n, per_shard=3)
    m = index_webdataset(str(src))
    assert {s: e["count"] for s, e in m["splits"].items()} == {"test": 4, "train": 9}
    assert m["splits"]["test"]["shards"][1]["name"] == "test/shard-000001.tar"
    assert split_images(str(src), "test").keys() == {f"sample{i:05d}" for i in range(4)}

    flat = tmp_path / "flat"
    flat.mkdir()
    write_wds(str(flat / "x-%06d.tar"), 12, per_shard=3)
    m = index_webdataset(str(flat / "x-{000000..000002}.tar"), test_shards=1)
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == ["x-000000.tar", "x-000001.tar"]
    assert [s["name"] for s in m["splits"]["test"]["shards"]] == ["x-000002.tar"]  # x-000003 left out
    with pytest.raises(DataError, match=r"x-000004.tar: shard missing \(6 of the 10"):
        index_webdataset(str(flat / "x-{000000..000009}.tar"))


def test_samples_of_another_shape_refused_naming_shard_and_key(tmp_path: Path, capsys):
    src = tmp_path / "wds"
    src.mkdir()
    write_wds(str(src / "p-%06d.tar"), 12, odd=7)
    assert shards_main(["index", str(src)]) == 2  # a user error: refused before anything is written
    err = capsys.readouterr().err
    assert f"{src / 'p-000001.tar'}: sample 'sample00007': image shape [C,H,W]=[3, 20, 22]" in err
    assert "not one shape" in err
    assert not (src / "manifest.json").exists()

    other = tmp_path / "other"
    other.mkdir()
    write_wds(str(other / "p-%06d.tar"), 10, per_shard=5)
    write_wds(str(other / "q-%06d.tar"), 5, h=24)  # a second set of another size in the same folder
    with pytest.raises(DataError, match=r"q-000000.tar: sample 'sample00000': image shape .*=\[3, 24, 24\] differs "
                                        r"from \[3, 20, 24\] of .*p-000000.tar: sample 'sample00000'"):
        index_webdataset(str(other))


def test_missing_or_ambiguous_image_member_refused(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    with wds.TarWriter(str(src / "a.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": _encoded(_image(0, 8, 8), "JPEG"), "png": _encoded(_image(0, 8, 8), "PNG")})
        sink.write({"__key__": "k1", "png": _encoded(_image(1, 8, 8), "PNG")})
    with pytest.raises(DataError, match=r"a.tar: sample 'k0': 2 image members \['jpg', 'png'\].*--image-ext"):
        index_webdataset(str(src))
    with pytest.raises(DataError, match=r"a.tar: sample 'k1': no .jpg member"):
        index_webdataset(str(src), image_ext="jpg")
    m = index_webdataset(str(src), image_ext="png")
    assert m["splits"]["train"]["count"] == 2 and m["source"]["ignored_members"] == ["jpg"]


def test_index_never_replaces_a_builders_manifest(tmp_path: Path):
    root = str(tmp_path / "ours")
    build_images(root, train=20, test=10, per_shard=10)
    before = shardformat.read_manifest(root)
    with pytest.raises(DataError, match="manifest written by the builder of dataset 'synthetic-disc-8'"):
        index_webdataset(root)
    assert shardformat.read_manifest(root) == before


@pytest.mark.parametrize("decode, where", [
    ({"image": "gif"}, "decode.image"),
    ({"image": "jpg", "resize_from": [3, 8]}, "decode.resize_from"),
    ({"image": "jpg", "resize_from": [1, 8, 8]}, "decode.resize_from: resizing"),
    ({"image": "jpg", "scale": 2}, "decode: unknown field(s) ['scale']"),
])
def test_manifest_decode_field_validated(tmp_path: Path, decode: dict, where: str):
    root = str(tmp_path / "ours")
    m = build_images(root, train=20, test=10, per_shard=10)
    m["decode"] = decode
    with pytest.raises(DataError, match=f"manifest.json: {where}".replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        shardformat.validate_manifest(m, "manifest.json")
