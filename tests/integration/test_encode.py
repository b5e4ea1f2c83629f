"""The encoding stage: byte-identical latent shards for any world size, skip-done re-runs, preemption,
and stage 2's refusal of latents from another encoder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.stagerun import run_stage, tiny_overrides
from tsvae_dist import storage
from tsvae_dist.cli import compose
from tsvae_dist.config import to_container
from tsvae_dist.data.datasets import ensure_dataset
from tsvae_dist.data.prefetch import ShardPrefetcher
from tsvae_dist.errors import CheckpointError, DataError
from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.io import save_model
from tsvae_dist.runtime.preemption import Preempted, StopFlag
from tsvae_dist.stages import encode
from tsvae_dist.stages.stage2 import check_latents

TRAIN_SHARDS, TEST_SHARDS = 8, 2  # 512 and 128 images at 64 per shard (tiny_overrides)


class StopAfter(StopFlag):
    """A stop flag that reads as set from its (n+1)-th check on: a preemption at a known boundary."""

    def __init__(self, n: int):
        super().__init__()
        self.checks_left = n

    def is_set(self) -> bool:
        self.checks_left -= 1
        return self.checks_left < 0


def _save_encoder(cfg, seed: int) -> None:
    """A stage-1 model artifact with random weights (the encoder's values do not matter here)."""
    torch.manual_seed(seed)
    model = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution)
    save_model(cfg.layout.model("stage1"), model, to_container(cfg), "stage1", samples_seen=0)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_but_run_dir(files: dict[str, bytes], reference: dict[str, bytes]) -> bool:
    """Equal latents from another run directory: only the manifest's encoder URL may differ."""
    def comparable(f: dict[str, bytes]) -> dict:
        manifest = json.loads(f["manifest.json"])
        manifest["encoder"].pop("url")
        return {**f, "manifest.json": manifest}
    return comparable(files) == comparable(reference)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A dataset, a random encoder, and its latents from a world-size-1 encoding (copied aside)."""
    root = tmp_path_factory.mktemp("encode")
    overrides = tiny_overrides(root / "data", root / "run", **{"eval.batch_size": 24, "eval.workers": 1})
    cfg = compose(overrides)
    ensure_dataset(cfg.dataset, cfg.dataset_root)
    storage.makedirs(str(root / "run" / "stage1"))
    _save_encoder(cfg, seed=0)
    run_stage("encode", overrides)
    reference = _files(root / "run" / "encode" / "latents")
    return {"root": root, "overrides": overrides, "cfg": cfg, "reference": reference}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage subprocesses run; avoids oversubscribing a busy machine
    yield
    torch.set_num_threads(threads)


def _fresh_run(encoded, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the run with the stage-1 model only (no encode output)."""
    run_dir = tmp_path / "run"
    shutil.copytree(encoded["root"] / "run", run_dir, ignore=shutil.ignore_patterns("encode"))
    return run_dir, [*encoded["overrides"], f"run_dir={run_dir}"]


def test_world_size_1_and_2_write_byte_identical_latents(encoded):
    reference = encoded["reference"]
    names = {f"{split}/shard-{i:06d}.tar" for split, n in (("train", TRAIN_SHARDS), ("test", TEST_SHARDS))
             for i in range(n)}
    assert set(reference) == {"manifest.json"} | names | {n + ".done" for n in names}
    manifest = check_latents(encoded["cfg"])  # stage 2 accepts them: the same encoder
    assert manifest["splits"]["train"]["count"] == 512 and manifest["shape"] == [8]

    latents = encoded["root"] / "run" / "encode" / "latents"
    shutil.rmtree(encoded["root"] / "run" / "encode")
    run_stage("encode", encoded["overrides"], nproc=2)
    assert _files(latents) == reference  # shards, done markers and manifest, byte for byte


def test_rerun_after_a_kill_encodes_only_unfinished_shards(encoded):
    """A kill leaves shards without a done marker (possibly a stale shard file): only those are redone."""
    run_dir = encoded["root"] / "run"
    latents = run_dir / "encode" / "latents"
    if _files(latents) != encoded["reference"]:  # this test alone: write the reference output first
        shutil.rmtree(run_dir / "encode")
        run_stage("encode", encoded["overrides"])
    redo = ["train/shard-000001.tar", "train/shard-000005.tar", "test/shard-000000.tar"]
    for name in redo:
        (latents / f"{name}.done").unlink()
    (latents / redo[0]).write_bytes(b"a stale, partial shard")
    (latents / "manifest.json").unlink()
    (run_dir / "encode" / "MANIFEST.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in latents.rglob("*.done")}

    proc = run_stage("encode", encoded["overrides"])
    assert "encode train: rank 0 skips 6 finished shard(s)" in proc.stderr
    assert "encode test: rank 0 skips 1 finished shard(s)" in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished shards were not rewritten
    assert _files(latents) == encoded["reference"]
    assert (run_dir / "encode" / "MANIFEST.json").exists()


def test_preempted_encoding_resumes_to_the_same_output(encoded, tmp_path, caplog, one_thread):
    run_dir, overrides = _fresh_run(encoded, tmp_path)
    cfg = compose(overrides)
    with pytest.raises(Preempted, match="in split train, round 3"):
        encode.run(cfg, stop=StopAfter(3))  # stops before the 4th of 8 train rounds
    latents = run_dir / "encode" / "latents"
    assert sorted(p.name for p in latents.rglob("*.done")) == [f"shard-{i:06d}.tar.done" for i in range(3)]
    assert not (run_dir / "encode" / "MANIFEST.json").exists()

    with caplog.at_level(logging.INFO, logger="tsvae_dist.stages.encode"):
        encode.run(cfg, stop=StopFlag())
    assert "encode train: rank 0 skips 3 finished shard(s)" in caplog.text
    assert _same_but_run_dir(_files(latents), encoded["reference"])


def test_latents_of_another_encoder_are_refused_and_re_encoded(encoded, tmp_path, caplog, one_thread):
    run_dir, overrides = _fresh_run(encoded, tmp_path)
    shutil.copytree(encoded["root"] / "run" / "encode", run_dir / "encode")
    cfg = compose(overrides)
    check_latents(cfg)
    _save_encoder(cfg, seed=1)  # stage 1 retrained: a different encoder
    with pytest.raises(CheckpointError, match="latents were made by encoder sha256=.*re-run the encode stage"):
        check_latents(cfg)

    (run_dir / "encode" / "MANIFEST.json").unlink()
    with caplog.at_level(logging.INFO, logger="tsvae_dist.stages.encode"):
        encode.run(cfg, stop=StopFlag())
    assert "skips" not in caplog.text  # every done marker named the old encoder
    check_latents(cfg)
    new = _files(run_dir / "encode" / "latents")
    old = encoded["reference"]
    assert set(new) == set(old)
    assert all(new[name] != old[name] for name in new if name.endswith(".tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_input_shard_is_a_one_line_data_error(encoded, tmp_path, workers):
    data = tmp_path / "data"
    shutil.copytree(encoded["root"] / "data", data)
    manifest = json.loads((data / "manifest.json").read_text())
    entries = manifest["splits"]["train"]["shards"][:3]
    (data / entries[1]["name"]).write_bytes(b"not a tar")
    with ShardPrefetcher(str(data), entries, manifest["shape"], workers) as decoded:
        name, keys, images = next(decoded)
        assert name == entries[0]["name"] and images.shape == (64, 3, 32, 32) and len(keys) == 64
        with pytest.raises(DataError) as info:
            next(decoded)
    message = str(info.value)
    assert entries[1]["name"] in message and "sha256" in message and "\n" not in message
