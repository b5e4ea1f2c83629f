"""Checkpoints: atomic, keep >= 2, a broken newest file falls back, a changed config is refused."""

from __future__ import annotations

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
