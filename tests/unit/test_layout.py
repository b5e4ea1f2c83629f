"""The run layout: one owner for every path, the stage registry, and what reads progress from it."""

from __future__ import annotations

import importlib
import json

import pytest

from tsvae_dist import storage
from tsvae_dist.cli import compose
from tsvae_dist.layout import STAGES, TRAINING_STAGES, RunLayout, checkpoint_name, checkpoint_samples, stage_module
from tsvae_dist.pipeline.follow import stage_progress
from tsvae_dist.pipeline.launcher import plan
from tsvae_dist.train.checkpoint import CheckpointStore


def test_every_stage_in_the_registry_is_a_module_with_run():
    for stage in STAGES:
        assert callable(importlib.import_module(stage_module(stage)).run)
    with pytest.raises(ValueError, match="unknown stage 'generate'"):
        stage_module("generate")  # a tool, not a pipeline stage


def test_paths_of_a_run():
    layout = RunLayout("s3://bucket/runs/x")
    assert layout.model("stage1") == "s3://bucket/runs/x/stage1/model.pt"
    assert layout.record("encode") == "s3://bucket/runs/x/encode/MANIFEST.json"
    assert layout.latents == "s3://bucket/runs/x/encode/latents"
    assert layout.report == "s3://bucket/runs/x/evaluate/report.json"
    assert layout.partial_sums_of(2, 4) == "s3://bucket/runs/x/evaluate/partial/rank-00002-of-00004.pt"
    assert not layout.is_local and RunLayout("runs/x").is_local


def test_checkpoint_names_round_trip_and_are_what_the_store_writes(tmp_path):
    assert checkpoint_samples(checkpoint_name(1234)) == 1234
    assert checkpoint_samples("ckpt-12.pt") is None and checkpoint_samples("model.pt") is None
    layout = RunLayout(str(tmp_path))
    url = CheckpointStore(layout.checkpoints("stage1")).save({"step": 1}, samples_seen=640)
    assert url.endswith("/stage1/checkpoints/" + checkpoint_name(640))


def test_progress_and_plan_read_the_run_directory(tmp_path):
    """stage_progress (action=status, the Slurm follower) and the launcher's plan read only the layout's files."""
    cfg = compose([f"run_dir={tmp_path / 'run'}", f"data_root={tmp_path / 'data'}"])
    layout = cfg.layout
    assert [s.done for s in plan(cfg)] == [False] * len(STAGES)
    storage.write_text_atomic(layout.record("stage1"), "{}")
    storage.makedirs(layout.checkpoints("stage2"))
    storage.write_bytes_atomic(storage.join(layout.checkpoints("stage2"), checkpoint_name(128)), b"x")
    storage.write_text_atomic(layout.metrics("stage2"), json.dumps({"step": 3, "samples": 192}) + "\n")
    assert [s.done for s in plan(cfg)] == [True, False, False, False]
    progress, last = stage_progress(cfg, "stage2", running=True)  # a running stage counts its metrics lines
    assert progress.startswith("192/") and last.endswith(checkpoint_name(128))
    assert stage_progress(cfg, "stage2")[0].startswith("128/")  # a stopped one: what its checkpoint holds
    assert set(TRAINING_STAGES) <= set(STAGES)
