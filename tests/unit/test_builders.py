"""Dataset builders on small raw files made here: counts, shapes, crop geometry, determinism, errors."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main as shards_cli
from shards.celeba import build_celeba, preprocess
from shards.cifar10 import build_cifar10
from shards.folder import build_folder, is_test
from shards.idx import build_idx
from tests.datautil import split_images
from tsvae_dist.data import shardformat
from tsvae_dist.errors import DataError


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def _samples(root: str, split: str) -> dict[str, np.ndarray]:
    """{key: uint8 [C,H,W]} of a split, read back through the stages' decoding path."""
    return split_images(root, split)


def _shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {split: [s["sha256"] for s in e["shards"]] for split, e in manifest["splits"].items()}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx)


def _idx(images: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    return header + images.astype(np.uint8).tobytes()


@pytest.fixture
def idx_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (23, 28, 28), dtype=np.uint8),
              "test": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)}
    src = tmp_path / "mnist-raw"
    src.mkdir()
    (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(arrays["train"]), mtime=0))
    (src / "t10k-images-idx3-ubyte").write_bytes(_idx(arrays["test"]))  # an uncompressed one works too
    return src, arrays


def test_idx_counts_shapes_values_and_determinism(tmp_path, idx_dir):
    src, arrays = idx_dir
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m = build_idx(str(src), a, name="mnist", samples_per_shard=10)
    build_idx(str(src), b, name="mnist", samples_per_shard=10)
    assert _tree(a) == _tree(b)
    assert m["shape"] == [1, 28, 28] and m["dtype"] == "uint8" and m["name"] == "mnist"
    assert m["splits"]["train"]["count"] == 23 and [s["count"] for s in m["splits"]["train"]["shards"]] == [10, 10, 3]
    assert m["splits"]["test"]["count"] == 7
    assert [i["file"] for i in m["source"]["inputs"]] == ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"]
    for split, arr in arrays.items():
        got = _samples(a, split)
        assert sorted(got) == [f"{split}-{i:08d}" for i in range(len(arr))]
        for i in range(len(arr)):
            assert np.array_equal(got[f"{split}-{i:08d}"][0], arr[i])


def test_idx_errors_name_the_file(tmp_path, idx_dir):
    src, _ = idx_dir
    bad = src / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DataError, match=f"^{bad}: .* bytes; dims \\[7, 28, 28\\]"):
        build_idx(str(src), str(tmp_path / "out"), name="mnist")
    bad.unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: input file missing"):
        build_idx(str(src), str(tmp_path / "out"), name="mnist")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (binary version)


def _cifar_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane, row-major
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


@pytest.fixture
def cifar_raw(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    folder = tmp_path / "raw" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    train = []
    for i in range(1, 6):
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        train.append(images)
        (folder / f"data_batch_{i}.bin").write_bytes(_cifar_batch(images, rng.integers(0, 10, 3)))
    test = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    (folder / "test_batch.bin").write_bytes(_cifar_batch(test, rng.integers(0, 10, 4)))
    archive = tmp_path / "raw" / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-bin")
    return folder, archive, {"train": np.concatenate(train), "test": test}


def test_cifar10_from_folder_and_archive(tmp_path, cifar_raw):
    folder, archive, arrays = cifar_raw
    a = build_cifar10(str(folder.parent), str(tmp_path / "a"), samples_per_shard=4)  # the folder's parent
    b = build_cifar10(str(archive), str(tmp_path / "b"), samples_per_shard=4)
    assert a["shape"] == [3, 32, 32]
    assert a["splits"]["train"]["count"] == 15 and a["splits"]["test"]["count"] == 4
    assert _shard_hashes(a) == _shard_hashes(b)  # same records, byte-identical shards
    assert b["source"]["inputs"][0]["file"] == "cifar-10-binary.tar.gz"
    for split, arr in arrays.items():
        got = _samples(str(tmp_path / "a"), split)
        for i in range(len(arr)):
            assert np.array_equal(got[f"{split}-{i:08d}"], arr[i].transpose(2, 0, 1))  # planes decoded as RGB


def test_cifar10_rejects_a_partial_record(tmp_path, cifar_raw):
    folder, _, _ = cifar_raw
    batch = folder / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin: 9218 bytes is not a whole number of 3073-byte records"):
        build_cifar10(str(folder), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# CelebA


def _face(seed: int) -> np.ndarray:
    """A 218x178 RGB image: smooth noise (JPEG-friendly) with a bright square exactly where the paper crops."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 60, (14, 12, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((178, 218), Image.Resampling.BILINEAR)).copy()
    img[45:173, 25:153] = 230
    return img


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


CELEBA_IDS = {"train": [1, 2, 3, 162770], "val": [162771], "test": [182638, 202599]}


@pytest.fixture
def celeba_raw(tmp_path: Path) -> tuple[Path, Path, Path]:
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for ids in CELEBA_IDS.values():
        for n in ids:
            (folder / f"{n:06d}.jpg").write_bytes(_jpeg(_face(n)))
    archive = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"img_align_celeba/{path.name}")
    # a partition that moves image 3 to the test split
    partition = tmp_path / "list_eval_partition.txt"
    codes = {"train": 0, "val": 1, "test": 2}
    lines = [f"{n:06d}.jpg {2 if n == 3 else codes[s]}" for s, ids in CELEBA_IDS.items() for n in ids]
    partition.write_text("\n".join(sorted(lines)) + "\n")
    return folder, archive, partition


def test_celeba_crop_geometry_is_the_papers():
    rows, cols = np.meshgrid(np.arange(218), np.arange(178), indexing="ij")
    arr = np.stack([rows, cols, (rows + cols) % 256], axis=-1).astype(np.uint8)  # pixel = its coordinates
    out = np.asarray(preprocess(_png(arr), "test", crop=128, resolution=128))
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out, arr[45:173, 25:153])  # rows 45:173, columns 25:153
    out140 = np.asarray(preprocess(_png(arr), "test", crop=140, resolution=256))
    assert out140.shape == (256, 256, 3)
    wide = np.asarray(preprocess(_png(arr), "test", crop=140, resolution=140))
    assert np.array_equal(wide, arr[39:179, 19:159])
    with pytest.raises(DataError, match="test: 178x200 pixels; aligned CelebA images are 178x218"):
        preprocess(_png(arr[:200]), "test", crop=128, resolution=64)


def test_celeba_resize_is_antialiased():
    arr = np.zeros((218, 178, 3), dtype=np.uint8)
    arr[::2, ::2] = arr[1::2, 1::2] = 255  # a one-pixel checkerboard: pure aliasing for a point sampler
    out = np.asarray(preprocess(_png(arr), "test", crop=128, resolution=64)).astype(np.float64)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3  # filtered to flat grey


@pytest.mark.parametrize("resolution", [64, 128])
def test_celeba_folder_counts_splits_and_crop(tmp_path, celeba_raw, resolution):
    folder, _, _ = celeba_raw
    m = build_celeba(str(folder), str(tmp_path / "out"), resolution=resolution, samples_per_shard=3)
    assert m["name"] == f"celeba{resolution}" and m["shape"] == [3, resolution, resolution]
    assert {s: e["count"] for s, e in m["splits"].items()} == {"train": 4, "val": 1, "test": 2}
    assert m["source"]["crop"] == {"rows": [45, 173], "cols": [25, 153]}
    test = _samples(str(tmp_path / "out"), "test")
    assert sorted(test) == ["test-182638", "test-202599"]
    img = test["test-182638"].astype(np.float64)
    assert img.min() > 200  # only the bright square (the surround is < 60): the crop is where the paper puts it


def test_celeba_zip_with_partition_file_and_determinism(tmp_path, celeba_raw):
    folder, archive, partition = celeba_raw
    z1 = build_celeba(str(archive), str(tmp_path / "z1"), partition=str(partition), samples_per_shard=2, workers=2)
    build_celeba(str(archive), str(tmp_path / "z2"), partition=str(partition), samples_per_shard=2)
    assert _tree(str(tmp_path / "z1")) == _tree(str(tmp_path / "z2"))  # byte-identical, with or without workers
    assert {s: e["count"] for s, e in z1["splits"].items()} == {"train": 3, "val": 1, "test": 3}
    assert "test-000003" in _samples(str(tmp_path / "z1"), "test")
    assert [i["file"] for i in z1["source"]["inputs"]] == ["list_eval_partition.txt", "img_align_celeba.zip"]
    f = build_celeba(str(folder), str(tmp_path / "f"), partition=str(partition), samples_per_shard=2)
    assert _shard_hashes(f) == _shard_hashes(z1)  # the folder and its zip give the same shards
    partition.write_text(partition.read_text() + "999999.jpg 0\n")
    with pytest.raises(DataError, match="lists 1 image.*absent"):
        build_celeba(str(folder), str(tmp_path / "x"), partition=str(partition))


# ---------------------------------------------------------------------------------------------
# Any folder of images


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(30):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = ("", "a", "a/b")[i % 3]
        if i % 5 == 0:
            Image.fromarray(arr).convert("RGBA").save(root / sub / f"img{i:02d}.png")
        elif i % 5 == 1:
            Image.fromarray(arr).convert("L").save(root / sub / f"img{i:02d}.jpg", quality=90)
        elif i % 5 == 2:
            Image.fromarray(arr).convert("P").save(root / sub / f"img{i:02d}.gif")
        else:
            Image.fromarray(arr).save(root / sub / f"img{i:02d}.jpeg", quality=90)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_builder(tmp_path, image_folder, channels):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m = build_folder(str(image_folder), a, resolution=16, channels=channels, test_fraction=0.3, samples_per_shard=8)
    build_folder(str(image_folder), b, resolution=16, channels=channels, test_fraction=0.3, samples_per_shard=8,
                 workers=2)
    assert _tree(a) == _tree(b)
    assert m["shape"] == [channels, 16, 16]
    rels = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("img*"))
    n_test = sum(is_test(r, 0.3) for r in rels)
    assert m["splits"]["test"]["count"] == n_test and m["splits"]["train"]["count"] == 30 - n_test
    assert 0 < n_test < 30
    assert all(s.shape == (channels, 16, 16) for s in _samples(a, "train").values())


def _split_folder(root: Path, layout: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """Grey PNGs in `root/<folder>/` (count per folder), each a constant image whose value names it."""
    made: dict[str, list[np.ndarray]] = {}
    value = 0
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            value += 5
            arr = np.full((16, 16), value, dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{i:03d}.png")
            made.setdefault(folder.split("/")[0], []).append(arr)
    return made


@pytest.mark.parametrize("test_folder", ["test", "val"])
def test_folder_builder_keeps_the_given_split(tmp_path, test_folder):
    src = tmp_path / "given"
    made = _split_folder(src, {"train": 7, "train/sub": 2, test_folder: 3})
    out = str(tmp_path / "out")
    assert shards_cli(["folder", "--src", str(src), "--out", out, "--resolution", "16", "--channels", "1"]) == 0
    m = shardformat.read_manifest(out)
    assert m["splits"]["train"]["count"] == 9 and m["splits"]["test"]["count"] == 3
    assert m["source"]["split"] == "folders" and m["source"]["splits"] == f"folders train/ and {test_folder}/"
    test_values = sorted(int(s[0, 0, 0]) for s in _samples(out, "test").values())
    assert test_values == sorted(int(a[0, 0]) for a in made[test_folder])  # exactly the given test images
    train_values = sorted(int(s[0, 0, 0]) for s in _samples(out, "train").values())
    assert train_values == sorted(int(a[0, 0]) for a in made["train"])


def test_folder_builder_prefers_test_over_val_and_refuses_strays_and_a_fraction(tmp_path):
    src = tmp_path / "given"
    _split_folder(src, {"train": 4, "val": 2, "test": 3})
    m = build_folder(str(src), str(tmp_path / "a"), resolution=16, channels=1)
    assert m["splits"]["test"]["count"] == 3 and m["source"]["ignored"] == {"val/": 2}
    with pytest.raises(DataError, match="drop --test-fraction"):
        build_folder(str(src), str(tmp_path / "b"), resolution=16, test_fraction=0.2)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "stray.png")
    with pytest.raises(DataError, match="1 images outside its train/ and test/ split folders.*stray.png"):
        build_folder(str(src), str(tmp_path / "c"), resolution=16)


def test_folder_builder_without_split_folders_splits_by_hash(tmp_path, image_folder):
    (image_folder / "train").mkdir()  # train/ alone is not a given split
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image_folder / "train" / "x.png")
    m = build_folder(str(image_folder), str(tmp_path / "out"), resolution=16)
    assert m["source"]["split"] == "hash" and m["source"]["test_fraction"] == 0.1
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 31


def test_folder_builder_names_an_undecodable_file(tmp_path, image_folder):
    (image_folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="a/broken.png: undecodable image"):
        build_folder(str(image_folder), str(tmp_path / "out"), resolution=16)


def test_folder_builder_scales_16_bit_grey_instead_of_clipping(tmp_path):
    src = tmp_path / "grey16"
    src.mkdir()
    ramp = np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (16, 1))  # 0 .. 61440 across the columns
    for i in range(6):
        Image.fromarray(ramp).save(src / f"ramp{i}.png")  # 16-bit grey PNGs (mode I;16)
    assert Image.open(src / "ramp0.png").mode in ("I;16", "I")
    for channels in (1, 3):
        out = str(tmp_path / f"out{channels}")
        build_folder(str(src), out, resolution=16, channels=channels, test_fraction=0.3)
        images = [*_samples(out, "train").values(), *_samples(out, "test").values()]
        assert len(images) == 6
        for image in images:
            assert image.shape == (channels, 16, 16)
            np.testing.assert_array_equal(image[0], (ramp >> 8).astype(np.uint8))  # 0, 16, ..., 240: not all 255


def test_folder_builder_names_the_file_not_pillows_buffer(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as info:
        build_folder(str(src), str(tmp_path / "out"), resolution=16)
    assert "'bad.png'" in str(info.value) and "BytesIO" not in str(info.value)


def test_cli_builds_and_verifies(tmp_path, idx_dir, capsys):
    src, _ = idx_dir
    out = str(tmp_path / "fashion")
    assert shards_cli(["fashion", "--src", str(src), "--out", out, "--samples-per-shard", "8"]) == 0
    assert shards_cli(["verify", out]) == 0
    assert "train: 23 samples in 3 shards OK" in capsys.readouterr().out
    assert shardformat.read_manifest(out)["name"] == "fashion"
    assert shards_cli(["cifar10", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert "input file missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Sample encoding (--encoding png|npy), every builder


def _cli_args(builder: str, request: pytest.FixtureRequest) -> list[str]:
    """The CLI arguments building a small dataset with `builder` from its fixture (no --out)."""
    if builder in ("mnist", "fashion"):
        return [builder, "--src", str(request.getfixturevalue("idx_dir")[0]), "--samples-per-shard", "8"]
    if builder == "cifar10":
        return [builder, "--src", str(request.getfixturevalue("cifar_raw")[1]), "--samples-per-shard", "4"]
    if builder == "celeba":
        return [builder, "--src", str(request.getfixturevalue("celeba_raw")[0]), "--samples-per-shard", "3",
                "--workers", "2"]
    if builder == "folder":
        return [builder, "--src", str(request.getfixturevalue("image_folder")), "--resolution", "16",
                "--samples-per-shard", "8"]
    return ["synthetic", "--train", "20", "--test", "6", "--resolution", "12", "--samples-per-shard", "8"]


@pytest.mark.parametrize("builder", ["mnist", "cifar10", "celeba", "folder", "synthetic"])
def test_npy_encoding_same_pixels_byte_identical_reruns(tmp_path, request, builder):
    args = _cli_args(builder, request)
    roots = {name: str(tmp_path / name) for name in ("png", "npy", "npy2")}
    assert shards_cli([*args, "--out", roots["png"]]) == 0  # the default
    assert shards_cli([*args, "--out", roots["npy"], "--encoding", "npy"]) == 0
    assert shards_cli([*args, "--out", roots["npy2"], "--encoding", "npy"]) == 0
    assert _tree(roots["npy"]) == _tree(roots["npy2"])
    png, npy = shardformat.read_manifest(roots["png"]), shardformat.read_manifest(roots["npy"])
    assert png["source"]["encoding"] == "png" and npy["source"]["encoding"] == "npy"
    assert {k: v for k, v in png["source"].items() if k != "encoding"} == \
        {k: v for k, v in npy["source"].items() if k != "encoding"}  # the same inputs' hashes
    assert png["shape"] == npy["shape"]
    for split, entry in npy["splits"].items():
        assert entry["count"] == png["splits"][split]["count"]
        shard = entry["shards"][0]
        url = shardformat.shard_url(roots["npy"], shard["name"])
        exts = {e for _, files in shardformat.iter_tar(url, sha256=shard["sha256"]) for e in files}
        assert exts == {"npy"}
        a, b = _samples(roots["png"], split), _samples(roots["npy"], split)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert shards_cli(["verify", roots["npy"]]) == 0
    with pytest.raises(SystemExit):  # argparse refuses other encodings
        shards_cli([*args, "--out", str(tmp_path / "x"), "--encoding", "webp"])


def test_encode_image_as_npy_is_raw_uint8_hwc():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = shardformat.encode_image_as(grey, "npy")
    assert np.load(io.BytesIO(data), allow_pickle=False).shape == (3, 4, 1)
    assert len(data) == 128 + 12  # the 128-byte header, then the pixels: no compression
    out = shardformat.decode_sample("u", "k", {"npy": data}, "image", [1, 3, 4])["image"]
    assert np.array_equal(out[0], grey)
    with pytest.raises(ValueError, match="encoding 'webp'"):
        shardformat.encode_image_as(grey, "webp")
    with pytest.raises(ValueError, match="expected uint8"):
        shardformat.encode_image_as(grey.astype(np.float32), "npy")
