"""Guard rails: each kind of bad data stops the job naming the shard and the key, unless skipping is
allowed, which is then counted, logged and limited. (More cases: test_loader.py.)"""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest

from tests.datautil import build_custom, build_images, rgb
from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.data.loader import LoaderConfig, StreamLoader
from tsvae_dist.errors import DataError


def _loader(root: str, *, workers: int = 0, streams: int = 2, batch: int = 8, skip: int = 0) -> StreamLoader:
    cfg = LoaderConfig(workers=workers, streams=streams, shuffle_buffer=8, max_skipped_samples=skip)
    return StreamLoader(root, "train", global_batch=batch, rank=0, world=1, cfg=cfg, seed=0)


def _keys(loader: StreamLoader, epoch: int = 0, start: int = 0) -> list[list[str]]:
    return [b["key"] for b in loader.epoch(epoch, start)]


def _rewrite(root: str, name: str, data: bytes, *, fix_hash: bool) -> str:
    """Replace shard `name`; with fix_hash the manifest is made to agree (a writer that went wrong)."""
    url = shardformat.shard_url(root, name)
    storage.write_bytes_atomic(url, data)
    if fix_hash:
        m = shardformat.read_manifest(root)
        for s in m["splits"]["train"]["shards"]:
            if s["name"] == name:
                s["sha256"] = shardformat.sha256_hex(data)
        shardformat.write_manifest(root, m)
    return url


@pytest.fixture
def images(tmp_path) -> str:
    root = str(tmp_path / "images")
    build_images(root, train=80, test=20, per_shard=20)  # 4 train shards of 20
    return root


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def test_shard_truncated_at_a_member_boundary(images):
    # a tar cut exactly after a member still parses: only the hash (or the count) can tell
    url = shardformat.shard_url(images, "train/shard-000001.tar")
    data = storage.read_bytes(url)
    tenth = _members(data)[10]
    cut = data[:tenth.offset_data + ((tenth.size + 511) // 512) * 512]
    assert len(list(shardformat.iter_tar_bytes(url, cut))) == 11
    _rewrite(images, "train/shard-000001.tar", cut, fix_hash=False)
    with pytest.raises(DataError, match=f"^{url}: sha256 .* differs from the manifest's"):
        _keys(_loader(images))


def test_corrupt_tar_names_the_shard_and_the_last_good_key(images):
    url = shardformat.shard_url(images, "train/shard-000002.tar")
    data = bytearray(storage.read_bytes(url))
    bad = _members(bytes(data))[5]
    data[bad.offset:bad.offset + 100] = b"\xff" * 100  # a smashed member header
    _rewrite(images, "train/shard-000002.tar", bytes(data), fix_hash=True)
    with pytest.raises(DataError, match=f"^{url}: corrupt or truncated tar after sample 'train-00000044'"):
        _keys(_loader(images, workers=2))


def test_manifest_count_differs_from_the_shard(images):
    m = shardformat.read_manifest(images)
    m["splits"]["train"]["shards"][3]["count"] = 21
    m["splits"]["train"]["count"] = 81
    shardformat.write_manifest(images, m)
    url = shardformat.shard_url(images, "train/shard-000003.tar")
    with pytest.raises(DataError, match=f"^{url}: 20 samples; the manifest says 21"):
        _keys(_loader(images))


def test_missing_shard(images):
    url = shardformat.shard_url(images, "train/shard-000000.tar")
    storage.remove(url)
    with pytest.raises(DataError, match=f"^{url}: shard missing"):
        _keys(_loader(images))


def _npy_image(arr: np.ndarray) -> dict[str, bytes]:
    return {"npy": shardformat.encode_npy(arr)}


@pytest.mark.parametrize("bad, match", [
    (_npy_image(rgb(8, 8).astype(np.uint16)), "expected uint8 .npy, got uint16"),
    (_npy_image(rgb(8, 8)[:, :6]), r"image shape \(8, 6, 3\) \(HWC\); the manifest says \(8, 8, 3\)"),
    ({"png": b"\x89PNG\r\n\x1a\n" + b"\0" * 20}, r"undecodable \.png"),
])
def test_wrong_dtype_shape_or_bytes_name_shard_and_key(tmp_path, bad, match):
    root = str(tmp_path / "bad")
    samples = [(f"train-{i:08d}", _npy_image(rgb(8, 8, i))) for i in range(16)]
    samples[6] = ("train-00000006", bad)
    build_custom(root, samples, shape=[3, 8, 8], per_shard=4)
    url = shardformat.shard_url(root, "train/shard-000001.tar")
    with pytest.raises(DataError, match=f"^{url}: sample 'train-00000006': {match}"):
        _keys(_loader(root, workers=2))


def test_latent_of_the_wrong_dtype(tmp_path):
    root = str(tmp_path / "latents")
    samples = [(f"train-{i:08d}", shardformat.encode_latent(np.full(4, i), np.zeros(4))) for i in range(8)]
    samples[3] = ("train-00000003", {"mu.npy": shardformat.encode_npy(np.zeros(4)),  # float64
                                     "logsigma.npy": shardformat.encode_npy(np.zeros(4, np.float32))})
    build_custom(root, samples, shape=[4], kind="latent", per_shard=4)
    url = shardformat.shard_url(root, "train/shard-000000.tar")
    with pytest.raises(DataError, match=f"^{url}: sample 'train-00000003'.mu.npy: float64 \\[4\\]; the manifest "
                                        "says float32 \\[4\\]"):
        _keys(_loader(root, batch=4))


# ---------------------------------------------------------------------------------------------
# Skipping: an explicit policy with a counted limit


@pytest.fixture
def damaged(tmp_path) -> tuple[str, list[str]]:
    """48 samples in 6 shards of 8: two undecodable samples, and one shard whose bytes differ from the manifest."""
    root = str(tmp_path / "damaged")
    samples = [(f"train-{i:08d}", {"png": shardformat.encode_image(rgb(8, 8, i))}) for i in range(48)]
    for i in (3, 29):
        samples[i] = (f"train-{i:08d}", {"png": shardformat.encode_image(rgb(7, 8))})
    build_custom(root, samples, shape=[3, 8, 8], per_shard=8)
    url = shardformat.shard_url(root, "train/shard-000004.tar")  # samples 32..39
    storage.write_bytes_atomic(url, storage.read_bytes(url)[:-1024])
    bad = ["train-00000003", "train-00000029"] + [f"train-{i:08d}" for i in range(32, 40)]
    return root, bad


def test_no_skipping_by_default(damaged):
    root, _ = damaged
    with pytest.raises(DataError, match=r"^.*/train/shard-0000\d\d\.tar: (sample 'train-000000\d\d': image|sha256)"):
        _keys(_loader(root))


def test_skips_beyond_the_limit_stop_the_job(damaged):
    root, _ = damaged
    with pytest.raises(DataError, match=r"loader: (stream \d alone has )?\d+ bad samples this epoch.*more than "
                                        r"loader.max_skipped_samples=9; the last: .*train/shard-0000\d\d\.tar"):
        _keys(_loader(root, skip=9))


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_within_the_limit_are_counted_logged_and_exact_on_resume(damaged, caplog, workers):
    root, bad = damaged
    loader = _loader(root, skip=10, workers=workers)
    with caplog.at_level(logging.WARNING, logger="tsvae_dist.data.loader"):
        batches = _keys(loader, epoch=1)
    assert len(batches) == loader.steps_per_epoch == 6
    seen = {k for b in batches for k in b}
    assert not seen & set(bad)
    # every skip reported with its shard and key (the corrupt shard as one entry for its 8 samples)
    assert len(loader.skipped) == 3
    assert sum("sample 'train-00000003'" in m or "sample 'train-00000029'" in m for m in loader.skipped) == 2
    assert sum("shard-000004.tar: sha256" in m for m in loader.skipped) == 1
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 3
    assert "10 of loader.max_skipped_samples=10" in caplog.text
    # resuming mid-epoch skips the same samples and yields the rest of the same epoch
    assert _keys(_loader(root, skip=10, workers=workers), epoch=1, start=4) == batches[4:]


def test_a_stream_with_nothing_readable_is_an_error(tmp_path):
    root = str(tmp_path / "d")
    build_images(root, train=32, test=8, per_shard=8)  # 4 shards: 2 per stream
    for name in ("train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
                 "train/shard-000003.tar"):
        _rewrite(root, name, b"junk", fix_hash=False)
    with pytest.raises(DataError, match="stream 0 alone has 16 bad samples|none of its shards"):
        _keys(_loader(root, skip=10**6))
