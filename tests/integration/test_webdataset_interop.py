"""Stage 1 trains on WebDataset shards written by webdataset's own TarWriter and indexed where they lie."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from tests.stagerun import REPO, env, run_stage, tiny_overrides
from tsvae_dist.data import shardformat


def test_stage1_trains_on_indexed_tarwriter_shards(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    keys = []
    rng = np.random.default_rng(0)
    for s in range(5):  # 4 train shards, 1 test shard: 16 JPEGs of 40x48 each, with a class and a caption
        with wds.TarWriter(str(src / f"images-{s:04d}.tar")) as sink:
            for i in range(16):
                key = f"{s:02d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
                sink.write({"__key__": key, "jpg": buf.getvalue(), "cls": b"1", "txt": f"image {key}".encode()})
                keys.append(key)
    proc = run_stage_index(src)
    assert "train 64 samples / 4 shards, test 16 samples / 1 shards" in proc

    run_dir = tmp_path / "run"
    record = tmp_path / "keys"
    record.mkdir()
    overrides = [o for o in tiny_overrides(src, run_dir, **{"stage1.epochs": 1, "stage1.loader.record_keys": record})
                 if not o.startswith("dataset.synthetic")]
    run_stage("stage1", ["dataset=folder", "dataset.resolution=32", *overrides])
    assert (run_dir / "stage1" / "model.pt").exists()
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(ln)]
    assert losses and all(math.isfinite(x) for x in losses)
    seen = [k for ln in (record / "rank-0.jsonl").read_text().splitlines() for k in json.loads(ln)["keys"]]
    assert sorted(seen) == sorted(keys[:64])  # one epoch: every training sample once, none of the test shard
    assert shardformat.read_manifest(str(src))["decode"] == {"image": "jpg", "resize_from": [3, 40, 48]}


def run_stage_index(src: Path) -> str:
    """`python -m shards index SRC --resolution 32 --test-shards 1` as a user runs it; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "shards", "index", str(src), "--resolution", "32",
                           "--test-shards", "1"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
