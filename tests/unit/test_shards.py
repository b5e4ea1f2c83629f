"""Shard format, writer, synthetic dataset and CLI."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from shards.__main__ import main as shards_cli
from tests.datautil import build_custom, build_images, build_latents, rgb
from tsvae_dist import storage
from tsvae_dist.data import shardformat, synthetic
from tsvae_dist.data.writer import ShardWriter, finish_dataset, shard_entry, tar_bytes, write_shard
from tsvae_dist.errors import DataError


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


# ---------------------------------------------------------------------------------------------
# Writer


def test_builds_are_byte_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_images(a)
    build_images(b)
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    assert "manifest.json" in files_a and "train/shard-000011.tar" in files_a
    assert files_a == files_b
    # the same bytes through fsspec (memory://) as through the local fast path
    build_images("memory://shards-det/c")
    for name, data in files_a.items():
        assert storage.read_bytes(f"memory://shards-det/c/{name}") == data, name


def test_other_seed_gives_other_images(tmp_path):
    m0 = build_images(str(tmp_path / "s0"), seed=0)
    m1 = build_images(str(tmp_path / "s1"), seed=1)
    assert m0["splits"]["train"]["shards"][0]["sha256"] != m1["splits"]["train"]["shards"][0]["sha256"]


def test_tar_members_are_sorted_with_fixed_metadata():
    data = tar_bytes([("b-1", {"png": b"x", "cls": b"1"}), ("a-1", {"png": b"yy"})])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["a-1.png", "b-1.cls", "b-1.png"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    assert tar_bytes([("a-1", {"png": b"yy"}), ("b-1", {"cls": b"1", "png": b"x"})]) == data


@pytest.mark.parametrize("samples", [
    [("a.b", {"png": b""})],  # dot in key
    [("a", {"png": b""}), ("a", {"png": b""})],  # duplicate key
    [("a", {})],  # no files
    [("a", {"../png": b""})],  # bad extension
])
def test_tar_rejects_bad_samples(samples):
    with pytest.raises(ValueError):
        tar_bytes(samples)


def test_shard_writer_splits_and_reports(tmp_path):
    root = str(tmp_path / "d")
    with ShardWriter(root, "train", 3) as w:
        for i in range(7):
            w.add(f"train-{i:08d}", {"png": shardformat.encode_image(rgb(4, 4, i))})
    entry = w.close()
    assert entry["count"] == 7
    assert [(s["name"], s["count"]) for s in entry["shards"]] == [
        ("train/shard-000000.tar", 3), ("train/shard-000001.tar", 3), ("train/shard-000002.tar", 1)]
    for s in entry["shards"]:
        assert shard_entry(root, s["name"]) == s
    assert not storage.exists(shardformat.manifest_url(root))  # the manifest only comes with finish_dataset
    manifest = finish_dataset(root, name="t", kind="image", shape=[3, 4, 4], splits={"train": entry},
                              source={"why": "test"}, extra_field=5)
    assert shardformat.read_manifest(root) == manifest
    assert manifest["extra_field"] == 5 and manifest["dtype"] == "uint8"


def test_write_shard_returns_count_and_hash(tmp_path):
    url = str(tmp_path / "x" / "train" / "shard-000000.tar")
    count, sha = write_shard(url, [("k-1", shardformat.encode_latent(np.zeros(3), np.ones(3)))])
    assert count == 1 and sha == shardformat.sha256_hex(storage.read_bytes(url))


# ---------------------------------------------------------------------------------------------
# Synthetic dataset


def test_synthetic_counts_shapes_and_keys(tmp_path):
    root = str(tmp_path / "syn")
    m = build_images(root, train=45, test=10, per_shard=16, resolution=12)
    assert m["kind"] == "image" and m["shape"] == [3, 12, 12] and m["dtype"] == "uint8"
    assert m["intrinsic_dim"] == 4 == synthetic.INTRINSIC_DIM
    assert m["source"]["params"] == dict(resolution=12, train=45, test=10, samples_per_shard=16, seed=0)
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [16, 16, 13]
    assert [s["count"] for s in m["splits"]["test"]["shards"]] == [10]
    for split, count in (("train", 45), ("test", 10)):
        keys = []
        for shard in m["splits"][split]["shards"]:
            url = shardformat.shard_url(root, shard["name"])
            for key, files in shardformat.iter_tar(url, sha256=shard["sha256"], count=shard["count"]):
                image = shardformat.decode_sample(url, key, files, "image", m["shape"])["image"]
                assert image.shape == (3, 12, 12) and image.dtype == np.uint8
                keys.append(key)
        assert keys == [f"{split}-{i:08d}" for i in range(count)]


def test_synthetic_images_have_four_active_factors():
    # The images are a smooth function of (x, y, radius, hue): its Jacobian has rank 4 (all factors
    # visible), and every image is the background plus one disc.
    res = 32
    f0 = np.array([[16.0, 15.0, 6.0, 0.3]])
    base = synthetic.disc_images(f0, res).astype(np.float64)
    jac = []
    for i, eps in enumerate((0.25, 0.25, 0.25, 0.02)):
        f = f0.copy()
        f[0, i] += eps
        jac.append(((synthetic.disc_images(f, res).astype(np.float64) - base) / eps).ravel())
    singular = np.linalg.svd(np.stack(jac), compute_uv=False)
    assert singular.min() > 0.05 * singular.max()
    corner = base[0, 0, 0]
    assert np.allclose(corner, np.rint(np.array(synthetic.BACKGROUND) * 255))
    rng = np.random.default_rng(0)
    f = synthetic.sample_factors(rng, 500, res)
    r_hi = synthetic.RADIUS[1] * res
    assert (f[:, 0] >= r_hi).all() and (f[:, 0] <= res - r_hi).all()
    assert (f[:, 3] >= 0).all() and (f[:, 3] < 1).all()


def test_ensure_synthetic_builds_once_and_refuses_other_params(tmp_path):
    root = str(tmp_path / "syn")
    params = dict(resolution=8, train=40, test=8, samples_per_shard=16, seed=3)
    m = synthetic.ensure_synthetic(root, **params)
    storage.remove(shardformat.shard_url(root, "test/shard-000000.tar"))
    assert synthetic.ensure_synthetic(root, **params) == m  # found by its manifest: not rebuilt
    assert not storage.exists(shardformat.shard_url(root, "test/shard-000000.tar"))
    message = r"manifest\.json: source\.params\.resolution: built with 8, asked for 16"
    with pytest.raises(DataError, match=message):
        synthetic.ensure_synthetic(root, **{**params, "resolution": 16})
    with pytest.raises(DataError, match=r"source\.params\.seed"):
        synthetic.ensure_synthetic(root, **{**params, "seed": 4})


def test_ensure_synthetic_refuses_foreign_dataset(tmp_path):
    root = str(tmp_path / "lat")
    build_latents(root)
    with pytest.raises(DataError, match=r"source\.generator"):
        synthetic.ensure_synthetic(root, resolution=8, train=40, test=8, samples_per_shard=16)


def test_cli_builds_and_verifies(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert shards_cli(["synthetic", "--out", out, "--resolution", "8", "--train", "20", "--test", "5",
                       "--samples-per-shard", "8"]) == 0
    assert shardformat.read_manifest(out)["splits"]["train"]["count"] == 20
    assert shards_cli(["verify", out + "/manifest.json"]) == 0
    assert "train: 20 samples in 3 shards OK" in capsys.readouterr().out
    with open(os.path.join(out, "test", "shard-000000.tar"), "r+b") as f:  # flip one byte
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 1]))
    assert shards_cli(["verify", out]) == 1
    assert "test/shard-000000.tar: sha256" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Manifest validation


def _manifest(tmp_path) -> tuple[str, dict]:
    root = str(tmp_path / "m")
    return root, build_images(root, train=30, test=10, per_shard=16)


@pytest.mark.parametrize("mutate, where", [
    (lambda m: m.pop("kind"), "kind: missing"),
    (lambda m: m.update(format="other/1"), "format: expected"),
    (lambda m: m.update(kind="video"), "kind: unknown kind 'video'"),
    (lambda m: m.update(dtype="float32"), "dtype: kind 'image' needs dtype 'uint8'"),
    (lambda m: m.update(shape=[4, 8, 8]), "shape: images need"),
    (lambda m: m["splits"]["train"].update(count=31), "splits.train.count: 31 != 30"),
    (lambda m: m["splits"]["train"]["shards"][1].update(name="train/../x.tar"), "train.shards[1].name"),
    (lambda m: m["splits"]["test"]["shards"][0].update(name="train/shard-000000.tar"), "test.shards[0].name"),
    (lambda m: m["splits"]["train"]["shards"][0].update(sha256="abc"), "splits.train.shards[0].sha256"),
    (lambda m: m["splits"]["train"]["shards"][0].update(count=0), "splits.train.shards[0].count"),
    (lambda m: m["splits"]["train"].update(shards=[]), "splits.train.shards: expected a non-empty list"),
])
def test_manifest_validation_names_file_and_key(tmp_path, mutate, where):
    root, m = _manifest(tmp_path)
    mutate(m)
    url = shardformat.manifest_url(root)
    storage.write_text_atomic(url, json.dumps(m))
    with pytest.raises(DataError) as e:
        shardformat.read_manifest(root)
    assert str(e.value).startswith(url + ": ") and where in str(e.value)
    with pytest.raises(DataError):
        shardformat.write_manifest(str(tmp_path / "other"), m)


def test_manifest_missing_or_not_json(tmp_path):
    root = str(tmp_path / "none")
    with pytest.raises(DataError, match="no manifest"):
        shardformat.read_manifest(root)
    storage.write_text_atomic(shardformat.manifest_url(root), "{nope")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        shardformat.read_manifest(root + "/manifest.json")


def test_dataset_root_accepts_manifest_url():
    assert shardformat.dataset_root("s3://b/d/manifest.json") == "s3://b/d"
    assert shardformat.dataset_root("s3://b/d/") == "s3://b/d"
    assert shardformat.shard_url("/x/d", "train/shard-000001.tar") == "/x/d/train/shard-000001.tar"


# ---------------------------------------------------------------------------------------------
# Sample codec and tar reading


def test_encode_image_roundtrip_gray_and_rgb():
    rng = np.random.default_rng(0)
    for shape, c in (((5, 6, 3), 3), ((5, 6, 1), 1), ((5, 6), 1)):
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        png = shardformat.encode_image(arr)
        assert png == shardformat.encode_image(arr.copy())
        out = shardformat.decode_sample("u", "k", {"png": png}, "image", [c, 5, 6])["image"]
        assert np.array_equal(out, arr.reshape(5, 6, c).transpose(2, 0, 1))
        npy = shardformat.decode_sample("u", "k", {"npy": shardformat.encode_npy(arr.reshape(5, 6, c))},
                                        "image", [c, 5, 6])["image"]
        assert np.array_equal(npy, out)


def test_decode_accepts_jpeg():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb(8, 8, 100)).save(buf, format="JPEG", quality=95)
    out = shardformat.decode_sample("u", "k", {"jpg": buf.getvalue()}, "image", [3, 8, 8])["image"]
    assert out.shape == (3, 8, 8) and abs(int(out.mean()) - 100) <= 2


@pytest.mark.parametrize("files, shape, match", [
    ({"txt": b"hi"}, [3, 4, 4], r"unknown extension\(s\) \['txt'\]"),
    ({"png": b"", "npy": b""}, [3, 4, 4], "2 image files"),
    ({"png": shardformat.encode_image(rgb(4, 5))}, [3, 4, 4], r"image shape \(4, 5, 3\)"),
    ({"png": shardformat.encode_image(rgb(4, 4))}, [1, 4, 4], r"image shape \(4, 4, 3\)"),
    ({"png": b"not a png"}, [3, 4, 4], "undecodable .png"),
    ({"npy": shardformat.encode_npy(np.zeros((4, 4, 3), np.float32))}, [3, 4, 4], "expected uint8 .npy"),
])
def test_decode_image_errors_name_shard_and_key(files, shape, match):
    with pytest.raises(DataError, match=match) as e:
        shardformat.decode_sample("s3://b/train/shard-000002.tar", "train-00000007", files, "image", shape)
    assert str(e.value).startswith("s3://b/train/shard-000002.tar: sample 'train-00000007'")


def test_decode_never_unpickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="unreadable .npy"):
        shardformat.decode_sample("u", "k", {"npy": buf.getvalue()}, "image", [3, 1, 1])


def test_decode_rejects_rgba_png():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA").save(buf, format="PNG")
    with pytest.raises(DataError, match="mode 'RGBA'"):
        shardformat.decode_sample("u", "k", {"png": buf.getvalue()}, "image", [3, 4, 4])


def test_decode_latent_checks():
    files = shardformat.encode_latent(np.arange(4), -np.arange(4))
    out = shardformat.decode_sample("u", "k", files, "latent", [4])
    assert out["mu"].dtype == np.float32 and np.array_equal(out["log_sigma"], -np.arange(4, dtype=np.float32))
    with pytest.raises(DataError, match=r"u: sample 'k'.mu.npy: float32 \[4\]; the manifest says float32 \[5"):
        shardformat.decode_sample("u", "k", files, "latent", [5])
    with pytest.raises(DataError, match="latents need exactly"):
        shardformat.decode_sample("u", "k", {"mu.npy": files["mu.npy"]}, "latent", [4])
    bad = {**files, "mu.npy": shardformat.encode_npy(np.zeros(4, np.float64))}
    with pytest.raises(DataError, match="float64"):
        shardformat.decode_sample("u", "k", bad, "latent", [4])


def test_iter_tar_rejects_corrupt_and_truncated(tmp_path):
    root = str(tmp_path / "c")
    samples = [(f"train-{i:08d}", {"png": shardformat.encode_image(rgb(4, 4, i))}) for i in range(4)]
    m = build_custom(root, samples, shape=[3, 4, 4])
    shard = m["splits"]["train"]["shards"][0]
    url = shardformat.shard_url(root, shard["name"])
    data = storage.read_bytes(url)
    keys = [k for k, _ in shardformat.iter_tar(url, sha256=shard["sha256"], count=4)]
    assert keys == [k for k, _ in samples]

    storage.write_bytes_atomic(url, b"\x00garbage" * 100)
    with pytest.raises(DataError, match=f"^{url}: (not a readable tar|corrupt)"):
        list(shardformat.iter_tar(url))
    # cut inside the third member's data: tarfile notices
    storage.write_bytes_atomic(url, data[: 512 * 5 + 10])
    with pytest.raises(DataError, match=f"^{url}: .*(truncated|corrupt)"):
        list(shardformat.iter_tar(url))
    # cut exactly after the second sample: the tar parses cleanly; only the count or the hash catch it
    cut = data[: 2 * (512 + 512)]
    storage.write_bytes_atomic(url, cut)
    assert len(list(shardformat.iter_tar(url))) == 2
    with pytest.raises(DataError, match=f"^{url}: 2 samples; the manifest says 4"):
        list(shardformat.iter_tar(url, count=4))
    with pytest.raises(DataError, match=f"^{url}: sha256 .* differs"):
        list(shardformat.iter_tar(url, sha256=shard["sha256"]))
    storage.remove(url)
    with pytest.raises(DataError, match="shard missing"):
        list(shardformat.iter_tar(url))


def test_iter_tar_rejects_ungrouped_keys(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("a.mu.npy", "b.mu.npy", "a.logsigma.npy"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="u.tar: sample 'a': key appears twice"):
        list(shardformat.iter_tar_bytes("u.tar", buf.getvalue()))


def test_decode_opens_only_the_format_the_extension_names():
    from PIL import Image

    arr = np.full((4, 4, 3), 9, np.uint8)
    gif, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(gif, format="GIF")
    Image.fromarray(arr).save(jpeg, format="JPEG")
    with pytest.raises(DataError, match=r"u: sample 'k': undecodable .png"):  # PIL alone would open the GIF
        shardformat.decode_sample("u", "k", {"png": gif.getvalue()}, "image", [3, 4, 4])
    with pytest.raises(DataError, match=r"u: sample 'k': undecodable .png"):
        shardformat.decode_sample("u", "k", {"png": jpeg.getvalue()}, "image", [3, 4, 4])
    out = shardformat.decode_sample("u", "k", {"jpeg": jpeg.getvalue()}, "image", [3, 4, 4])["image"]
    assert out.shape == (3, 4, 4)
