"""The data plane against the real local S3 server (Ceph radosgw from launch/dev_cluster.sh).

Storage semantics (atomic writes, fresh listings), the webdataset opener in spawned workers, the
loader streaming from s3://, and real 2-rank training runs from s3://: equal step counts and the
documented coverage, exact resume after SIGKILL, a short outage survived with nothing lost, a
persistent one failing in bounded time. The gateway is stopped or frozen with
`dev_cluster.sh gateway ...`; every outage is undone in a `finally`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cluster import DEV_CLUSTER, REPO
from tests.datautil import build_images, split_images
from tests.stagerun import env, kill_job, run_stage, stage_command, tiny_overrides
from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.data.loader import LoaderConfig, StreamLoader
from tsvae_dist.layout import RunLayout, checkpoint_samples

pytestmark = pytest.mark.s3

# The 2-rank runs: 11 shards (10 of 48 samples, one of 32) over 2 ranks x 2 workers = 4 streams.
TRAIN_EXTRA = {"dataset.synthetic_samples_per_shard": 48, "stage1.loader.workers": 2, "stage1.loader.streams": 4}


@pytest.fixture(scope="module")
def s3(s3_env: dict[str, str]) -> Iterator[str]:
    """A fresh prefix on the test bucket, with the server's credentials and endpoint in os.environ for the
    module (stage processes inherit them); removed afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_env.items():
            mp.setenv(name, value)
        prefix = f"s3://{s3_env['TSVAE_S3_BUCKET']}/tests/{uuid.uuid4().hex[:12]}"
        yield prefix
        with contextlib.suppress(OSError):
            storage.remove(prefix)


def gateway(action: str) -> None:
    proc = subprocess.run(["bash", str(DEV_CLUSTER), "gateway", action], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"dev_cluster.sh gateway {action}: {proc.stderr}"


@contextlib.contextmanager
def gateway_frozen() -> Iterator[None]:
    gateway("pause")
    try:
        yield
    finally:
        gateway("resume")


# ---------------------------------------------------------------------------------------------
# Storage


def test_atomic_writes_and_fresh_listings(s3):
    d = f"{s3}/storage"
    assert storage.listdir(d) == [] and not storage.exists(f"{d}/a.bin")
    storage.write_bytes_atomic(f"{d}/a.bin", b"old")
    assert storage.read_bytes(f"{d}/a.bin") == b"old" and storage.listdir(d) == ["a.bin"]

    # A write whose block fails commits nothing: the old object stays, a new one never appears.
    for url in (f"{d}/a.bin", f"{d}/b.bin"):
        with pytest.raises(RuntimeError, match="boom"), storage.atomic_writer(url) as f:
            f.write(b"half of the new conten")
            raise RuntimeError("boom")
    assert storage.read_bytes(f"{d}/a.bin") == b"old" and storage.listdir(d) == ["a.bin"]
    with storage.atomic_writer(f"{d}/a.bin") as f:
        f.write(b"new")
    assert storage.read_bytes(f"{d}/a.bin") == b"new"

    # Another process writes: listings and existence checks here see it at once.
    code = f"from tsvae_dist import storage; storage.write_bytes_atomic({f'{d}/c.bin'!r}, b'c')"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env(), timeout=60)
    assert storage.listdir(d) == ["a.bin", "c.bin"] and storage.exists(f"{d}/c.bin")
    storage.remove(f"{d}/c.bin")
    assert storage.listdir(d) == ["a.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{d}/missing.bin")


def test_endpoint_and_bounds_come_from_the_environment(s3, monkeypatch):
    monkeypatch.setenv("TSVAE_STORAGE_TIMEOUT_S", "3")
    options = storage.s3_options()
    assert options["endpoint_url"] == os.environ["AWS_ENDPOINT_URL_S3"]
    assert options["config_kwargs"]["read_timeout"] == options["config_kwargs"]["connect_timeout"] == 3
    assert options["config_kwargs"]["retries"]["total_max_attempts"] == 1
    # A server nobody listens on: a clear error naming the URL once the retry window is over.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("TSVAE_STORAGE_RETRY_S", "2")
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"^{s3}/x\.bin: read failed for 2 s \(\d+ attempts"):
        storage.read_bytes(f"{s3}/x.bin")
    assert time.monotonic() - start < 10


def test_direct_gets_are_signed_as_the_server_expects(s3, monkeypatch):
    """The plain-HTTP GET path (tsvae_dist/storage/s3_direct.py) against radosgw: awkward keys, the same
    bytes as s3fs, a wrong key refused at once."""
    data = os.urandom(3 << 20)
    urls = [f"{s3}/direct/{name}" for name in ("plain.bin", "a b+c=d~e(1).bin", "ü/ß é.tar")]
    for url in urls:
        storage.write_bytes_atomic(url, data + url.encode())

    def no_s3fs(*args, **kwargs):
        raise AssertionError("read through s3fs")

    with monkeypatch.context() as mp:
        mp.setattr(storage._bounded_s3_class(), "cat_file", no_s3fs)
        assert storage.s3_direct.getter(storage.s3_options()) is not None
        for url in urls:
            assert storage.read_bytes(url) == data + url.encode()
    with monkeypatch.context() as mp:
        mp.setenv("TSVAE_S3_DIRECT_GET", "0")
        for url in urls:
            assert storage.read_bytes(url) == data + url.encode()
    with monkeypatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        start = time.monotonic()
        refused = r"^s3://.*/plain\.bin: access denied \(HTTP 403 SignatureDoesNotMatch\)"
        with pytest.raises(PermissionError, match=refused):
            storage.read_bytes(urls[0])
        assert time.monotonic() - start < 2  # not retried


# ---------------------------------------------------------------------------------------------
# Reading shards


@pytest.fixture(scope="module")
def images_s3(s3: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The same 230-sample, 12-shard dataset locally and on s3:// (built twice: the builds are deterministic)."""
    local = str(tmp_path_factory.mktemp("s3data") / "images")
    build_images(local)
    build_images(f"{s3}/images")
    return local, f"{s3}/images"


def _loader(root: str, workers: int = 2) -> StreamLoader:
    cfg = LoaderConfig(workers=workers, streams=4, shuffle_buffer=16)
    return StreamLoader(root, "train", global_batch=20, rank=0, world=1, cfg=cfg, seed=0)


def _epoch(root: str, epoch: int, start: int = 0) -> list[dict]:
    return list(_loader(root).epoch(epoch, start))


def test_loader_streams_from_s3_as_from_disk_and_resumes(images_s3):
    local, remote = images_s3
    assert storage.read_bytes(f"{remote}/manifest.json") == storage.read_bytes(f"{local}/manifest.json")
    full = _epoch(remote, 1)
    assert [b["key"] for b in full] == [b["key"] for b in _epoch(local, 1)]
    tail = _epoch(remote, 1, start=6)
    assert [b["key"] for b in tail] == [b["key"] for b in full[6:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, full[6:], strict=True))


def test_webdataset_pipeline_in_spawned_workers(images_s3):
    import webdataset as wds

    _, remote = images_s3
    manifest = shardformat.read_manifest(remote)
    urls = [shardformat.shard_url(remote, s["name"]) for s in manifest["splits"]["train"]["shards"]]

    def keys(worker_init_fn, workers: int = 2) -> list[str]:
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("__key__")
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                             worker_init_fn=worker_init_fn, multiprocessing_context="spawn")
        batches = iter(loader)
        try:
            return sorted(k for (k,) in batches)
        finally:
            batches._shutdown_workers()  # now, not when a later test collects the failed iterator

    assert keys(storage.webdataset_worker_init) == [f"train-{i:08d}" for i in range(230)]
    with pytest.raises(ValueError, match="s3://.*: no gopen handler defined"):  # what unregistered workers do
        keys(None, workers=1)


def test_our_shards_decoded_by_a_plain_webdataset_pipeline(images_s3):
    """Interop, our writer -> webdataset's reader: its own decoder gives the pixels ours gives."""
    import webdataset as wds

    _, remote = images_s3
    manifest = shardformat.read_manifest(remote)
    ours = split_images(remote, "train")
    storage.register_webdataset_opener()
    urls = [shardformat.shard_url(remote, s["name"]) for s in manifest["splits"]["train"]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8").to_tuple("__key__", "png")
    theirs = {key: image.transpose(2, 0, 1) for key, image in dataset}
    assert theirs.keys() == ours.keys() and len(theirs) == manifest["splits"]["train"]["count"]
    assert all(np.array_equal(theirs[k], ours[k]) for k in ours)


def test_webdataset_shards_on_s3_indexed_in_place_and_streamed(s3, tmp_path):
    """Interop, webdataset's writer -> us: TarWriter shards uploaded to s3://, indexed there (resized at
    read time), streamed by the loader with the pixels of a local decode."""
    import webdataset as wds
    from PIL import Image

    from shards.index import index_webdataset

    root = f"{s3}/wds-{uuid.uuid4().hex[:8]}"
    want = {}
    rng = np.random.default_rng(1)
    for s in range(3):
        local = tmp_path / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(local)) as sink:
            for i in range(6):
                key = f"k{s}{i:03d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": key, "png": buf.getvalue(), "json": b"{}"})
                with Image.open(io.BytesIO(buf.getvalue())) as img:
                    want[key] = np.asarray(shardformat.resize_square(img, 8)).transpose(2, 0, 1)
        storage.write_bytes_atomic(f"{root}/{local.name}", local.read_bytes())
    manifest = index_webdataset(f"{root}/shard-{{000000..000002}}.tar", resolution=8, test_shards=1)
    assert storage.listdir(root) == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["decode"] == {"image": "png", "resize_from": [3, 12, 18]}
    by_folder = index_webdataset(root, resolution=8, test_shards=1)  # the folder's URL: the same shards
    assert by_folder["splits"] == manifest["splits"] and by_folder["source"]["shards"] == root
    loader = StreamLoader(root, "train", global_batch=4, rank=0, world=1,
                          cfg=LoaderConfig(workers=2, streams=2, shuffle_buffer=4), seed=0)
    seen = {}
    for batch in loader.epoch(0):
        for key, image in zip(batch["key"], batch["image"], strict=True):
            seen[key] = image.numpy()  # the stored bytes
    assert seen.keys() == {k for k in want if not k.startswith("k2")}
    assert all(np.array_equal(seen[k], want[k]) for k in seen)


def test_frozen_server_is_a_storage_error_naming_the_shard(images_s3, monkeypatch):
    _, remote = images_s3
    monkeypatch.setenv("TSVAE_STORAGE_RETRY_S", "4")
    monkeypatch.setenv("TSVAE_STORAGE_TIMEOUT_S", "2")
    loader = _loader(remote)  # reads the manifest
    with gateway_frozen():
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match=rf"^{remote}/train/shard-\d{{6}}\.tar: read failed for \d+ s"):
            list(loader.epoch(0))
        assert time.monotonic() - start < 4 + 2 + 8  # the window, one request timeout, worker start-up


# ---------------------------------------------------------------------------------------------
# Training from s3://


def _records(directory: Path) -> dict[int, list[tuple[int, int, list[str]]]]:
    """{rank: [(epoch, step, keys), ...]} from `loader.record_keys`; a line cut by SIGKILL is dropped."""
    out = {}
    for path in sorted(directory.glob("rank-*.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                rows.append((r["epoch"], r["step"], r["keys"]))
        out[int(path.stem.split("-")[1])] = rows
    return out


def _sequence(records: dict[int, list]) -> dict[int, list[tuple[int, int, list[str]]]]:
    """Per rank, one entry per (epoch, step) in order: a re-run step (after a resume) must repeat the keys."""
    out = {}
    for rank, rows in records.items():
        steps: dict[tuple[int, int], list[str]] = {}
        for epoch, step, keys in rows:
            assert steps.get((epoch, step), keys) == keys, f"rank {rank} epoch {epoch} step {step} changed on resume"
            steps[(epoch, step)] = keys
        out[rank] = [(e, s, steps[(e, s)]) for e, s in sorted(steps)]
    return out


def _overrides(s3: str, run: str, record: Path, **extra) -> list[str]:
    return tiny_overrides(f"{s3}/synthetic", f"{s3}/{run}", **TRAIN_EXTRA,
                          **{"stage1.loader.record_keys": str(record)}, **extra)


def _model(url: str) -> dict[str, torch.Tensor]:
    import io

    return torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)["model"]


def _wait_past_first_checkpoint(proc: subprocess.Popen, record: Path, run_dir: str, timeout: float = 240) -> None:
    """Until rank 0 has taken the batch after its first checkpoint (step 8 of 16, mid-epoch 0) and that
    checkpoint is committed on S3: it is written in the background while training goes on, so the step
    alone does not say it is there. The key record is cheap to poll; the listing follows it."""
    checkpoints = RunLayout(run_dir).checkpoints("stage1")
    deadline = time.monotonic() + timeout
    while not (any(e == 0 and s >= 8 for e, s, _ in _records(record).get(0, []))
               and any(checkpoint_samples(n) is not None for n in _listing(checkpoints))):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def _listing(url: str) -> list[str]:
    try:
        return storage.listdir(url)
    except Exception:  # not created yet
        return []


class _Output:
    """A child's merged output, read by a thread (so the pipe never fills) and searchable while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in ln for ln in self.lines):
                return True
            time.sleep(0.05)
        return False

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def _start(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(stage_command("stage1", overrides, nproc=2), cwd=REPO, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def reference(s3: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-rank stage-1 run from s3:// (2 epochs of 16 steps), with the keys each rank saw."""
    record = tmp_path_factory.mktemp("reference-keys")
    run_stage("stage1", _overrides(s3, "reference", record), nproc=2)
    return {"records": _records(record), "model": _model(f"{s3}/reference/stage1/model.pt")}


def test_two_ranks_from_s3_equal_steps_and_documented_coverage(s3, reference):
    records = reference["records"]
    manifest = shardformat.read_manifest(f"{s3}/synthetic")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 11 and len(shards) % 4  # shards do not divide world x workers
    expected_steps = [(e, s) for e in range(2) for s in range(16)]
    assert sorted(records) == [0, 1]
    for rank in (0, 1):  # the same steps on both ranks: nobody waits in an all-reduce for a missing batch
        assert [(e, s) for e, s, _ in records[rank]] == expected_steps
        assert all(len(keys) == 16 for _, _, keys in records[rank])
    metrics = [json.loads(ln) for ln in storage.read_text(f"{s3}/reference/stage1/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == list(range(4, 33, 4))

    # Coverage as the loader's docstring says: stream g yields N samples, all distinct when it holds >= N,
    # else all it holds and then repeats; a rank's batch is its streams' micro-batches in order.
    loader = StreamLoader(f"{s3}/synthetic", "train", global_batch=32, rank=0, world=2,
                          cfg=LoaderConfig(workers=2, streams=4), seed=0)
    n = loader.samples_per_stream()
    assert n == 16 * 8
    shard_keys = {s["name"]: [k for k, _ in shardformat.iter_tar(shardformat.shard_url(f"{s3}/synthetic", s["name"]))]
                  for s in shards}
    for epoch in range(2):
        seen = set()
        for g, plan in enumerate(loader.epoch_plan(epoch)):
            rank, j = divmod(g, 2)
            got = [k for e, _, keys in records[rank] if e == epoch for k in keys[j * 8:(j + 1) * 8]]
            have = {k for s in plan for k in shard_keys[s["name"]]}
            assert len(got) == n and set(got) <= have
            assert len(set(got)) == min(n, len(have))
            seen |= set(got)
        assert len(seen) == sum(min(n, sum(s["count"] for s in plan)) for plan in loader.epoch_plan(epoch))
        assert len(seen) < 512  # with these shard counts some samples are repeated and others wait an epoch


def test_sigkill_mid_epoch_then_resume_from_s3(s3, reference, tmp_path):
    record = tmp_path / "keys"
    overrides = _overrides(s3, "killed", record)
    proc = _start(overrides)
    out = _Output(proc)
    _wait_past_first_checkpoint(proc, record, f"{s3}/killed")
    kill_job(proc)
    out.text()
    assert not storage.exists(f"{s3}/killed/stage1/model.pt"), "killed too late: the run had finished"
    killed_steps = {(e, s) for rows in _records(record).values() for e, s, _ in rows}
    assert (1, 15) not in killed_steps

    resumed = run_stage("stage1", overrides, nproc=2)
    assert "resuming from s3://" in resumed.stderr + resumed.stdout
    assert _sequence(_records(record)) == _sequence(reference["records"])  # the keys seen, step by step
    model = _model(f"{s3}/killed/stage1/model.pt")
    assert all(torch.equal(model[k], reference["model"][k]) for k in model)


def test_short_outage_mid_epoch_loses_nothing(s3, reference, tmp_path):
    record = tmp_path / "keys"
    proc = _start(_overrides(s3, "outage", record))
    out = _Output(proc)
    try:
        _wait_past_first_checkpoint(proc, record, f"{s3}/outage")
        gateway("stop")
        try:
            # down until the run has met the outage (a read or a write retrying), then a little longer
            assert out.wait_for("retrying in", timeout=60), "the run never touched storage during the outage"
            time.sleep(2)
            assert proc.poll() is None
        finally:
            gateway("start")
        assert proc.wait(timeout=240) == 0, out.text()
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert "retrying in" in out.text()
    assert _sequence(_records(record)) == _sequence(reference["records"])
    model = _model(f"{s3}/outage/stage1/model.pt")
    assert all(torch.equal(model[k], reference["model"][k]) for k in model)


def test_persistent_outage_fails_the_run_in_bounded_time(s3, reference, tmp_path, monkeypatch):
    window, timeout = 6, 2
    monkeypatch.setenv("TSVAE_STORAGE_RETRY_S", str(window))
    monkeypatch.setenv("TSVAE_STORAGE_TIMEOUT_S", str(timeout))
    record = tmp_path / "keys"
    proc = _start(_overrides(s3, "down", record))
    out = _Output(proc)
    try:
        _wait_past_first_checkpoint(proc, record, f"{s3}/down")
        with gateway_frozen():
            start = time.monotonic()
            rc = proc.wait(timeout=120)
            elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            kill_job(proc)
    text = out.text()
    assert rc != 0
    # one line naming the URL (the stage's CLI prints StorageError as `error: ...`, no traceback)
    assert any(ln.startswith("error: ") and f"{s3}/" in ln and "failed for" in ln for ln in text.splitlines()), \
        text[-3000:]
    # the retry window, one request timeout, and the time torchrun takes to stop the other rank
    assert elapsed < window + timeout + 30, elapsed
