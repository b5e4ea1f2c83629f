"""The cluster fixtures stop what they started, and only that (dev_cluster.sh stood in for by a recorder)."""

from __future__ import annotations

import subprocess

import pytest

from tests import cluster


@pytest.fixture
def script(monkeypatch):
    """A fake `dev_cluster.sh`: `status` says whether anything of the selection is up; every call recorded."""
    calls: list[list[str]] = []
    state = {"running": False}

    def run(cmd, **kwargs):
        calls.append(cmd[2:])
        if cmd[2] == "status":
            return subprocess.CompletedProcess(cmd, 0 if state["running"] else 1, stdout=b"", stderr=b"")
        out = "export SLURM_CONF=/x/slurm.conf\nexport AWS_ENDPOINT_URL=http://h\nexport TSVAE_S3_BUCKET=b\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out if cmd[2] == "up" else "", stderr="")

    monkeypatch.setattr(cluster.subprocess, "run", run)
    monkeypatch.setattr(cluster, "_started", {})
    monkeypatch.setattr(cluster, "_to_stop", [])
    monkeypatch.delenv("TSVAE_KEEP_DEV_CLUSTER", raising=False)
    return calls, state


def test_what_the_session_started_is_stopped_once(script) -> None:
    calls, _ = script
    cluster.ensure_dev_cluster(slurm=True, s3=False)
    cluster.ensure_dev_cluster(slurm=True, s3=False)  # once per process and selection
    cluster.ensure_dev_cluster(slurm=False, s3=True)
    cluster.stop_started()
    cluster.stop_started()
    assert calls == [["status", "--no-s3"], ["up", "--no-s3"], ["status", "--no-slurm"], ["up", "--no-slurm"],
                     ["down", "--no-slurm"], ["down", "--no-s3"]]


def test_a_cluster_already_running_is_left_running(script) -> None:
    calls, state = script
    state["running"] = True
    cluster.ensure_dev_cluster(slurm=True, s3=False)
    cluster.stop_started()
    assert [c[0] for c in calls] == ["status", "up"]


def test_keep_variable_leaves_it_running(script, monkeypatch) -> None:
    calls, _ = script
    monkeypatch.setenv("TSVAE_KEEP_DEV_CLUSTER", "1")
    cluster.ensure_dev_cluster(slurm=False, s3=True)
    cluster.stop_started()
    assert [c[0] for c in calls] == ["status", "up"]
