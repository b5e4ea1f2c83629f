"""Fast checks of the Slurm launcher's pieces that need no cluster: stop flags, log reading, pre-submit checks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tsvae_dist.cli import compose
from tsvae_dist.errors import ConfigError
from tsvae_dist.pipeline.follow import failure_reason, log_error
from tsvae_dist.pipeline.slurm import JobRecord
from tsvae_dist.pipeline.submit import Partition, check_cluster
from tsvae_dist.runtime.preemption import StopFlag, ignore_stop_signals


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_later_flag_keeps_a_signal_caught_by_an_earlier_one(restore_handlers: None) -> None:
    early = StopFlag().install()  # the job wrapper's, installed first
    os.kill(os.getpid(), signal.SIGUSR2)  # arrives while the stage is still loading
    late = StopFlag().install()  # the trainer's
    assert late.is_set() and late.signal_name == "SIGUSR2"
    os.kill(os.getpid(), signal.SIGTERM)
    assert early.signals == late.signals == ("SIGUSR2", "SIGTERM")


def test_a_fresh_flag_is_clear_and_workers_ignore_stop_signals(restore_handlers: None) -> None:
    flag = StopFlag()
    assert not flag.is_set() and flag.signal_name is None and not flag.wait(0.01)
    ignore_stop_signals(0)
    for sig in StopFlag.SIGNALS:
        assert signal.getsignal(sig) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test process survives


def test_log_error_prefers_the_cause_over_a_lost_peer(tmp_path: Path) -> None:
    (tmp_path / "7_0_log.err").write_text(
        "[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in f\n"
        "[rank0]: torch.distributed.DistBackendError: [../gloo] Connection closed by peer\n"
        "srun: error: node1: task 0: Exited with exit code 1\n")
    (tmp_path / "7_1_log.err").write_text(
        "submitit INFO - Starting\nTraceback (most recent call last):\n  File \"loader.py\", line 9, in g\n"
        "    raise DataError(msg)\ntsvae_dist.errors.DataError: train/shard-000003.tar: sha256 mismatch\n")
    assert log_error(str(tmp_path), "7") == "tsvae_dist.errors.DataError: train/shard-000003.tar: sha256 mismatch"
    assert log_error(str(tmp_path), "8") is None

    failed = JobRecord("7", "FAILED", "1:0", "None", "", "", 1)
    assert "DataError" in failure_reason(failed, str(tmp_path), None)
    cancelled = JobRecord("9", "CANCELLED", "0:0", "None", "", "", 1)
    assert failure_reason(cancelled, str(tmp_path), ("stage1", failed)) == \
        "dependency never satisfied: stage1 (job 7) ended FAILED"


def test_check_cluster_names_the_setting_before_submitting() -> None:
    parts = {"debug": Partition("debug", True, 4, 4, 0), "gpu": Partition("gpu", False, 2, 96, 8)}
    check_cluster(compose(["cluster=slurm", "nodes=4"]), ["stage1", "evaluate"], parts)
    check_cluster(compose(["cluster=slurm_gpu", "nodes=2", "cluster.partition=gpu"]), ["stage1"], parts)
    cases = [
        (["cluster=slurm", "cluster.partition=nosuch"], "cluster.partition: 'nosuch' is not a partition"),
        (["cluster=slurm", "nodes=8"], "cluster.nodes: stage1 asks for 8 nodes but partition debug has 4"),
        (["cluster=slurm", "+cluster.stage_overrides.evaluate.nodes=5"], "cluster.stage_overrides.evaluate.nodes"),
        (["cluster=slurm", "cluster.tasks_per_node=4", "cluster.cpus_per_task=2"], "cluster.tasks_per_node"),
        (["cluster=slurm", "cluster.gpus_per_node=1", "cluster.tasks_per_node=1"], "cluster.gpus_per_node"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_cluster(compose(overrides), ["stage1", "encode", "stage2", "evaluate"], parts)


def test_cluster_configs_compose_and_cpu_only_config_refuses_gpus() -> None:
    for name in ("slurm", "slurm_gpu", "dev"):
        cfg = compose([f"cluster={name}", "nodes=2"])
        assert cfg.cluster.name == "slurm" and cfg.cluster.nodes == 2
    with pytest.raises(ConfigError, match="cluster.gpus_per_node: 1 GPU"):
        compose(["cluster=dev", "cluster.gpus_per_node=1"])
    delay = r"cluster.stage_overrides.stage1.signal_delay_s: must be in \[0, time_min x 60 = 60\)"
    with pytest.raises(ConfigError, match=delay):
        compose(["cluster=dev", "+cluster.stage_overrides.stage1.time_min=1", "cluster.signal_delay_s=90"])
