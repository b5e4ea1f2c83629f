"""Checkpoints: atomic, keep >= 2, a broken newest file falls back, a changed config is refused."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tsvae_dist.errors import CheckpointError
from tsvae_dist.train.checkpoint import CheckpointStore, check_resumable, config_differences


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"a": {"b": 1}}}


def test_keeps_the_newest_and_prunes_the_rest(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        store.save(state(step), samples_seen=step * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000000128.pt", "ckpt-000000000192.pt"]
    latest = store.load_latest()
    assert latest is not None and latest["step"] == 3 and latest["complete"]
    assert torch.equal(latest["model"]["w"], torch.full((3,), 3.0))


def test_truncated_newest_falls_back_to_previous(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    store.save(state(1), 64)
    newest = Path(store.save(state(2), 128))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    latest = store.load_latest()
    assert latest is not None and latest["step"] == 1


def test_no_checkpoint_and_no_temp_files_left(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "none"), keep=2)
    assert store.load_latest() is None
    store.save(state(5), 320)
    assert [p.name for p in (tmp_path / "none").iterdir()] == ["ckpt-000000000320.pt"]


class Evil:
    """Any non-tensor object: weights_only=True must refuse to unpickle it."""


def test_loading_refuses_pickled_objects(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    store.save(state(1), 64)
    torch.save({"complete": True, "obj": Evil()}, tmp_path / "ckpt-000000000128.pt")
    latest = store.load_latest()  # the pickled object is refused by weights_only=True: previous one wins
    assert latest is not None and latest["step"] == 1


def test_changed_config_names_the_keys() -> None:
    saved = {"stage1": {"lr": 1e-4, "epochs": 10}, "model": {"latent_dim": 64}}
    current = {"stage1": {"lr": 1e-3, "epochs": 10}, "model": {"latent_dim": 32}}
    assert config_differences(saved, current) == ["model.latent_dim", "stage1.lr"]
    with pytest.raises(CheckpointError, match="model.latent_dim, stage1.lr"):
        check_resumable(saved, current, "ckpt")
    check_resumable(saved, saved, "ckpt")


def test_added_removed_and_retyped_keys_are_differences() -> None:
    saved = {"stage1": {"lr": 1e-4, "epochs": 10, "extra": {}}, "model": {"latent_dim": 64}}
    gained = {"stage1": {"lr": 1e-4, "epochs": 10, "extra": {}, "warmup": 0}, "model": {"latent_dim": 64}}
    assert config_differences(saved, gained) == ["stage1.warmup"]  # a key the current config gained
    assert config_differences(gained, saved) == ["stage1.warmup"]  # one it lost
    lost_section = {"stage1": {"lr": 1e-4, "epochs": 10}, "model": {"latent_dim": 64}}
    assert config_differences(saved, lost_section) == ["stage1.extra"]  # an empty section counts
    assert config_differences(saved, {**saved, "model": {}}) == ["model", "model.latent_dim"]
    retyped = {"stage1": {"lr": 1e-4, "epochs": 10.0, "extra": {}}, "model": {"latent_dim": True}}
    assert config_differences(saved, retyped) == ["model.latent_dim", "stage1.epochs"]
    assert config_differences(saved, {"stage1": {"lr": 1e-4, "epochs": 10, "extra": {}},
                                      "model": {"latent_dim": 64}}) == []
    with pytest.raises(CheckpointError, match="stage1.warmup"):
        check_resumable(saved, gained, "ckpt")


def test_background_save_snapshots_the_state_and_commits_on_wait(tmp_path: Path, monkeypatch) -> None:
    from tsvae_dist import storage

    release = threading.Event()
    write = storage.write_bytes_atomic

    def held_write(url: str, data: bytes) -> None:
        release.wait(10)  # the write is in flight until the test lets it go
        write(url, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", held_write)
    store = CheckpointStore(str(tmp_path), keep=2)
    live = state(1)
    store.save_async(live, samples_seen=64)
    live["model"]["w"].add_(100.0)  # training goes on and changes the tensors: the snapshot must not change
    assert store.load_latest() is None  # nothing committed while the write is held
    release.set()
    store.wait()
    saved = store.load_latest()
    assert saved is not None and torch.equal(saved["model"]["w"], torch.full((3,), 1.0))


def test_failed_background_write_is_raised_at_the_next_save(tmp_path: Path, monkeypatch) -> None:
    from tsvae_dist import storage

    write = storage.write_bytes_atomic
    failing = {"ckpt-000000000128.pt", "ckpt-000000000256.pt"}

    def flaky_write(url: str, data: bytes) -> None:  # by name: the write runs whenever the thread gets to it
        if url.rsplit("/", 1)[-1] in failing:
            raise OSError("disk full")
        write(url, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", flaky_write)
    store = CheckpointStore(str(tmp_path), keep=2)
    store.save(state(1), samples_seen=64)
    store.save_async(state(2), samples_seen=128)  # returns at once; the error comes later
    with pytest.raises(CheckpointError, match="disk full"):
        store.save_async(state(3), samples_seen=192)
    store.wait()  # raised once, not again
    assert store.load_latest()["step"] == 1  # the failed one was never committed, nothing was pruned
    store.save_async(state(3), samples_seen=192)
    store.wait()
    assert store.load_latest()["step"] == 3
    store.save_async(state(4), samples_seen=256)
    with pytest.raises(CheckpointError, match="disk full"):  # the end of training (or a stop) waits: raised there
        store.wait()
