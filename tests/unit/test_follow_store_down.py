"""The Slurm follower when the object store stays down: it reports the job's own failure, not its polling."""

from __future__ import annotations

import pytest

from tsvae_dist import storage
from tsvae_dist.cli import compose
from tsvae_dist.layout import STAGES
from tsvae_dist.pipeline import follow
from tsvae_dist.pipeline.slurm import JobRecord
from tsvae_dist.storage import StorageError

CAUSE = "StorageError: s3://b/run/stage1/checkpoints/ckpt-000000000640.pt: no answer from the store for 45 s"


def test_a_stage_that_failed_on_the_store_is_reported_by_its_own_error(tmp_path, monkeypatch):
    cfg = compose([f"run_dir={tmp_path / 'run'}", f"data_root={tmp_path / 'data'}", "cluster.poll_s=0.01"])
    jobs = {stage: str(100 + i) for i, stage in enumerate(STAGES)}
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / f"{jobs['stage1']}_0_log.err").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n" + CAUSE + "\n")

    def down(*args, **kwargs):
        raise StorageError(f"s3://b/run: the store did not answer ({args[0] if args else ''})")

    for name in ("exists", "read_text", "read_bytes", "listdir"):  # every read of the run's files fails
        monkeypatch.setattr(storage, name, down)
    states = {"stage1": "FAILED", "encode": "CANCELLED", "stage2": "CANCELLED", "evaluate": "CANCELLED"}
    monkeypatch.setattr(follow, "accounting", lambda ids: {
        jobs[s]: JobRecord(jobs[s], states[s], "1:0" if s == "stage1" else "0:0", "", "", "", 1) for s in STAGES})

    with pytest.raises(follow.StageFailed) as info:
        follow.follow(cfg, jobs, str(folder))
    message = str(info.value)
    assert message.startswith(f"stage1: Slurm job {jobs['stage1']} FAILED") and CAUSE in message
    assert "MANIFEST" not in message and "did not answer (" not in message
