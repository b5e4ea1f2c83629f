"""The deterministic streaming loader: equal batch counts, world-size independence, exact resume."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.datautil import build_custom, build_images, build_latents, latent_value, rgb, split_images
from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.data.loader import LoaderConfig, StreamLoader
from tsvae_dist.data.workers import unit_float, unit_float_on
from tsvae_dist.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """230 train samples in 12 shards (11 of 20, one of 10): shard counts that deal unevenly."""
    root = str(tmp_path_factory.mktemp("loader") / "images")
    build_images(root, train=230, test=50, per_shard=20, resolution=8)
    return root


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> str:
    """240 train samples in 12 shards of 20: deals evenly over 1, 2, 3, 4, 6 or 12 streams."""
    root = str(tmp_path_factory.mktemp("loader") / "even")
    build_images(root, train=240, test=20, per_shard=20, resolution=8)
    return root


def _loader(root: str, *, rank: int = 0, world: int = 1, batch: int = 40, workers: int = 0, streams: int = 4,
            seed: int = 0, buffer: int = 16, split: str = "train", **kw) -> StreamLoader:
    cfg = LoaderConfig(workers=workers, streams=streams, shuffle_buffer=buffer, **kw)
    return StreamLoader(root, split, global_batch=batch, rank=rank, world=world, cfg=cfg, seed=seed)


def _keys(loader: StreamLoader, epoch: int, start: int = 0) -> list[list[str]]:
    return [b["key"] for b in loader.epoch(epoch, start)]


def test_every_rank_yields_the_same_number_of_batches(images):
    # 12 shards over 9 streams: three streams read two shards, six read one (one of them the short one)
    per_rank = []
    for rank in range(3):
        loader = _loader(images, rank=rank, world=3, batch=27, streams=9)
        batches = list(loader.epoch(0))
        assert loader.steps_per_epoch == 230 // 27 == len(batches)
        assert all(len(b["key"]) == 9 and b["image"].shape == (9, 3, 8, 8) for b in batches)
        per_rank.append(len(batches))
    assert per_rank == [8, 8, 8]


@pytest.mark.parametrize("workers", [0, 1])
def test_global_batches_do_not_depend_on_world_size_or_workers(images, workers):
    one = list(_loader(images, world=1, workers=0).epoch(2))
    ranks = [list(_loader(images, rank=r, world=2, workers=workers).epoch(2)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 5
    for step, batch in enumerate(one):
        parts = [ranks[0][step], ranks[1][step]]
        assert batch["key"] == parts[0]["key"] + parts[1]["key"]
        assert torch.equal(batch["image"], torch.cat([parts[0]["image"], parts[1]["image"]]))
    four = [list(_loader(images, rank=r, world=4, workers=0).epoch(2)) for r in range(4)]
    assert [k for step in range(5) for r in range(4) for k in four[r][step]["key"]] == \
        [k for b in one for k in b["key"]]


@pytest.mark.parametrize("workers, world", [(2, 1), (1, 4), (2, 2)])
def test_workers_give_the_same_batches_as_in_process(images, workers, world):
    # (2, 1): two streams per worker; (1, 4): one stream per rank; (2, 2): one stream per worker
    ref = list(_loader(images, workers=0).epoch(1))
    got = [list(_loader(images, workers=workers, world=world, rank=r).epoch(1)) for r in range(world)]
    for step, batch in enumerate(ref):
        parts = [got[r][step] for r in range(world)]
        assert batch["key"] == [k for p in parts for k in p["key"]]
        assert all(isinstance(p["image"], torch.Tensor) and p["image"].dtype == torch.uint8 for p in parts)
        assert torch.equal(batch["image"], torch.cat([p["image"] for p in parts]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_tail_of_the_uninterrupted_epoch(images, workers):
    loader = _loader(images, workers=workers, batch=20)
    full = list(loader.epoch(3))
    assert len(full) == loader.steps_per_epoch == 11
    for start in (1, 4, 10, 11):
        tail = list(loader.epoch(3, start_step=start))
        assert [b["key"] for b in tail] == [b["key"] for b in full[start:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, full[start:], strict=True))
    with pytest.raises(ValueError, match="start_step 12"):
        list(loader.epoch(3, start_step=12))


def test_resume_after_a_stream_wraps_around(images):
    # 5 streams: the one holding the short shard has 10 samples and must wrap within every epoch
    loader = _loader(images, batch=25, streams=5, buffer=8)
    full = _keys(loader, 0)
    assert _keys(loader, 0, start=7) == full[7:]


def test_epochs_differ_and_repeat_exactly(images):
    a, b = _loader(images), _loader(images)
    e0, e1 = _keys(a, 0), _keys(a, 1)
    assert e0 != e1
    assert _keys(b, 0) == e0 and _keys(b, 1) == e1  # a fresh loader with the same (seed, epoch)
    assert _keys(_loader(images, seed=1), 0) != e0
    assert a.epoch_plan(0) != a.epoch_plan(1)
    assert _keys(_loader(images, buffer=0), 0) != e0  # the buffer shuffles within streams


def test_even_dataset_yields_every_sample_exactly_once_per_epoch(even):
    for streams, world in ((4, 1), (6, 2), (12, 3)):
        keys = [k for r in range(world)
                for b in _loader(even, rank=r, world=world, streams=streams, batch=60).epoch(5) for k in b["key"]]
        assert len(keys) == len(set(keys)) == 240


def test_coverage_per_stream_as_documented(images):
    # micro-batches are concatenated in stream order, so slice j of a batch is stream j
    loader = _loader(images, batch=25, streams=5, buffer=8)
    n = loader.samples_per_stream()
    assert n == (230 // 25) * 5 == 45
    for epoch in range(3):
        batches = list(loader.epoch(epoch))
        distinct = 0
        for g, shards in enumerate(loader.epoch_plan(epoch)):
            got = [k for b in batches for k in b["key"][g * 5:(g + 1) * 5]]
            have = set()
            for s in shards:
                url = shardformat.shard_url(images, s["name"])
                have.update(k for k, _ in shardformat.iter_tar(url))
            assert len(got) == n and set(got) <= have
            if len(have) >= n:
                assert len(set(got)) == n  # no repeats
            else:
                assert set(got) == have  # every one of the stream's samples first, then repeats
            distinct += min(n, len(have))
        assert len({k for b in batches for k in b["key"]}) == distinct


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_a_data_error_naming_it(tmp_path, workers):
    root = str(tmp_path / "corrupt")
    build_images(root, train=80, test=20, per_shard=20)
    url = shardformat.shard_url(root, "train/shard-000002.tar")
    storage.write_bytes_atomic(url, storage.read_bytes(url)[:3000])  # truncated
    with pytest.raises(DataError, match=f"^{url}: sha256 .* differs"):
        list(_loader(root, workers=workers, batch=8).epoch(0))


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_tar_is_a_data_error_naming_it(tmp_path, workers):
    root = str(tmp_path / "garbage")
    m = build_images(root, train=80, test=20, per_shard=20)
    url = shardformat.shard_url(root, "train/shard-000001.tar")
    junk = b"\x07" * 4096
    storage.write_bytes_atomic(url, junk)
    m["splits"]["train"]["shards"][1]["sha256"] = shardformat.sha256_hex(junk)  # a writer gone wrong
    shardformat.write_manifest(root, m)
    with pytest.raises(DataError, match=f"^{url}: (not a readable tar|corrupt)"):
        list(_loader(root, workers=workers, batch=8).epoch(0))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("bad, match", [
    ({"png": shardformat.encode_image(rgb(7, 8))}, r"image shape \(7, 8, 3\)"),
    ({"txt": b"caption"}, r"unknown extension\(s\) \['txt'\]"),
])
def test_bad_sample_is_a_data_error_naming_shard_and_key(tmp_path, workers, bad, match):
    root = str(tmp_path / "bad")
    samples = [(f"train-{i:08d}", {"png": shardformat.encode_image(rgb(8, 8, i))}) for i in range(16)]
    samples[9] = ("train-00000009", bad)
    build_custom(root, samples, shape=[3, 8, 8], per_shard=4)
    url = shardformat.shard_url(root, "train/shard-000002.tar")
    with pytest.raises(DataError, match=f"^{url}: sample 'train-00000009': {match}"):
        list(_loader(root, workers=workers, batch=16, streams=2, buffer=0).epoch(0))


def test_latent_batches(tmp_path):
    root = str(tmp_path / "latents")
    build_latents(root, train=120, per_shard=10, kappa=5)
    loader = _loader(root, batch=24, streams=4, world=2, rank=1)
    batches = list(loader.epoch(0))
    assert len(batches) == 5
    for b in batches:
        assert set(b) == {"key", "mu", "log_sigma"}
        assert b["mu"].shape == b["log_sigma"].shape == (12, 5) and b["mu"].dtype == torch.float32
        for i, key in enumerate(b["key"]):
            mu, log_sigma = latent_value(key, 5)
            assert np.array_equal(b["mu"][i].numpy(), mu)
            assert np.array_equal(b["log_sigma"][i].numpy(), log_sigma)


def test_image_values_match_the_shards(images):
    """The loader hands over the stored bytes; scaled on the device they are `unit_float`'s values."""
    batch = next(iter(_loader(images).epoch(0)))
    assert batch["image"].dtype == torch.uint8
    scaled = unit_float_on(batch["image"], torch.device("cpu"))
    samples = split_images(images, "train")
    for i, key in enumerate(batch["key"]):
        assert np.array_equal(batch["image"][i].numpy(), samples[key])
        assert torch.equal(scaled[i], unit_float(samples[key]))


def test_unit_float_on_the_device_is_the_division_for_every_level():
    levels = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    got = unit_float_on(torch.from_numpy(levels), torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == (4, 1, 8, 8)
    assert np.array_equal(got.numpy().view(np.uint32), (levels / np.float32(255)).astype(np.float32).view(np.uint32))


def _worker_pids(loader: StreamLoader) -> list[int]:
    return sorted(w.pid for w in loader._workers._iterator._workers)


def test_workers_persist_across_epochs_and_a_resumed_epoch_on_them_is_exact(images):
    """One set of worker processes serves every epoch (told the epoch through shared memory), with the
    batches of fresh in-process passes; an abandoned epoch stops them and the next starts new ones."""
    ref = _loader(images, workers=0)
    loader = _loader(images, workers=2)
    epochs = [(0, 0), (1, 0), (1, 3), (2, 4)]
    pids = []
    for epoch, start in epochs:
        got = list(loader.epoch(epoch, start))
        want = list(ref.epoch(epoch, start))
        assert [b["key"] for b in got] == [b["key"] for b in want]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want, strict=True))
        pids.append(_worker_pids(loader))
    assert all(p == pids[0] for p in pids), pids
    partial = loader.epoch(3)
    next(partial)
    partial.close()  # abandoned mid-epoch: its workers are stopped, not reused with an epoch in flight
    assert loader._workers is None
    assert [b["key"] for b in loader.epoch(3, 2)] == _keys(ref, 3, 2)
    assert _worker_pids(loader) != pids[0]
    loader.close()
    assert loader._workers is None
    loader.close()  # idempotent


def test_a_process_exits_promptly_with_its_persistent_workers_alive(images):
    """Workers ignore SIGTERM (preemption is the main process's business), so multiprocessing's exit
    handler, which terminates and joins them, would wait forever; the loader stops them first."""
    script = (f"from tsvae_dist.data.loader import LoaderConfig, StreamLoader\n"
              f"loader = StreamLoader({images!r}, 'train', global_batch=40, rank=0, world=1, seed=0,\n"
              f"                      cfg=LoaderConfig(workers=2, streams=4))\n"
              f"list(loader.epoch(0))\n"
              f"raise SystemExit('left with the workers alive')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "left with the workers alive" in proc.stderr, proc.stderr


def test_pinned_batches_are_allocated_pinned(images, monkeypatch):
    """With pin_memory (the stages set it on CUDA) every batch tensor is allocated in pinned memory, so
    the loop's copy to the GPU is asynchronous. Pinning needs a GPU: without one, the allocation is
    recorded and made unpinned."""
    allocations = []
    empty = torch.empty

    def recording_empty(*args, pin_memory=False, **kwargs):
        allocations.append(pin_memory)
        return empty(*args, pin_memory=pin_memory and torch.cuda.is_available(), **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    plain = list(_loader(images, streams=1).epoch(0))
    assert allocations == []  # one stream, not pinned: the stream's array as it came
    pinned = list(StreamLoader(images, "train", global_batch=40, rank=0, world=1, seed=0, pin_memory=True,
                               cfg=LoaderConfig(workers=0, streams=1, shuffle_buffer=16)).epoch(0))
    assert allocations == [True] * len(pinned)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(plain, pinned, strict=True))
    if torch.cuda.is_available():
        assert all(b["image"].is_pinned() for b in pinned)


def test_memory_filesystem(images):
    root = "memory://loader-test/images"
    manifest = shardformat.read_manifest(images)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = storage.read_bytes(shardformat.shard_url(images, shard["name"]))
            storage.write_bytes_atomic(f"{root}/{shard['name']}", data)
    shardformat.write_manifest(root, manifest)
    assert _keys(_loader(root), 4) == _keys(_loader(images), 4)


def test_spawned_workers(even):
    # spawn-safe: every stage callable is module-level and the dataset is plain data
    ref = _keys(_loader(even, batch=60, streams=2), 0)
    assert _keys(_loader(even, batch=60, streams=2, workers=2, start_method="spawn"), 0) == ref


@pytest.mark.parametrize("kw, match", [
    (dict(streams=3, world=2, batch=6), "streams: 3 is not a multiple of the world size 2"),
    (dict(streams=4, world=2, workers=4, batch=8), "streams: 2 streams per rank .* multiple of workers=4"),
    (dict(streams=4, world=1, batch=30), "streams: 4 does not divide the global batch 30"),
    (dict(streams=0, world=2, workers=3, batch=10), "streams: 6 does not divide the global batch 10"),
    (dict(streams=4, world=1, batch=40, shuffle_buffer=-1), "shuffle_buffer: must be >= 0"),
    (dict(streams=4, world=1, batch=40, start_method="thread"), "start_method: unknown 'thread'"),
])
def test_config_validation_names_the_field(kw, match):
    world, batch = kw.pop("world"), kw.pop("batch")
    with pytest.raises(ConfigError, match=match):
        LoaderConfig(**kw).validate(batch, world)


def test_more_streams_than_shards_is_refused(images):
    with pytest.raises(ConfigError, match="loader.streams: 16 streams but split 'train' .* only 12 shards"):
        _loader(images, streams=16, batch=32)
    with pytest.raises(ConfigError, match="global batch 400 exceeds the 230 samples"):
        _loader(images, batch=400)
    with pytest.raises(DataError, match=r"splits\.val: no such split"):
        _loader(images, split="val")
    assert LoaderConfig(workers=2).resolve_streams(3) == 6 and LoaderConfig(workers=0).resolve_streams(3) == 3
