"""Fast checks of the Slurm launcher's pieces that need no cluster: stop flags, log reading, pre-submit checks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tsvae_dist.cli import compose
from tsvae_dist.errors import ConfigError
from tsvae_dist.pipeline.follow import failure_reason, log_cause, log_error, stage_progress
from tsvae_dist.pipeline.slurm import JobRecord
from tsvae_dist.pipeline.submit import Partition, check_cluster, stage_executor
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
    assert log_error(str(tmp_path), "7") == "rank 1: DataError: train/shard-000003.tar: sha256 mismatch"
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


def test_log_cause_takes_the_rank_that_raised_first_or_names_a_silently_killed_one(tmp_path: Path) -> None:
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n{}\n"
    (tmp_path / "5_0_log.err").write_text(trace.format("RuntimeError: a later consequence"))
    (tmp_path / "5_1_log.err").write_text(trace.format("tsvae_dist.errors.DataError: shard-1.tar key k: bad"))
    os.utime(tmp_path / "5_1_log.err", (1000, 1000))  # written first
    assert log_cause(str(tmp_path), "5") == ("rank 1: DataError: shard-1.tar key k: bad",
                                             str(tmp_path / "5_1_log.err"))
    (tmp_path / "6_0_log.err").write_text(trace.format("torch.distributed.DistBackendError: Connection closed by peer"))
    (tmp_path / "6_1_log.err").write_text("submitit INFO - Starting\n")  # SIGKILLed: no traceback
    what, where = log_cause(str(tmp_path), "6")
    assert what.startswith("rank 1: ended without a Python error") and where == str(tmp_path / "6_1_log.err")
    # On Slurm, srun says how a task ended (in task 0's log, the batch script's): that rank is the one named.
    (tmp_path / "4_0_log.err").write_text(trace.format("torch.distributed.DistBackendError: Connection closed by peer")
                                          + "srun: error: node3: task 2: Killed\n"
                                          + "srun: error: node1: tasks 0-1,3: Exited with exit code 1\n")
    for task in (1, 2, 3):
        (tmp_path / f"4_{task}_log.err").write_text("submitit INFO - Starting\n")
    what, where = log_cause(str(tmp_path), "4")
    assert what == "rank 2: ended by Killed; the other ranks lost their peer", what
    assert where == str(tmp_path / "4_2_log.err")


def test_a_cancelled_chain_says_cancelled_not_dependency_never_satisfied(tmp_path: Path) -> None:
    cancelled = JobRecord("9", "CANCELLED", "0:0", "None", "", "", 1)
    for previous in ("CANCELLED", "COMPLETING", "RUNNING"):
        before = JobRecord("8", previous, "0:15", "None", "", "", 1)
        assert failure_reason(cancelled, str(tmp_path), ("stage1", before)).startswith("cancelled"), previous


def test_progress_of_a_stopped_stage_is_its_checkpoint_not_metrics_past_it(tmp_path: Path) -> None:
    cfg = compose([f"run_dir={tmp_path}", "stage1.batch_size=64"])
    (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage1" / "checkpoints" / "ckpt-000000000640.pt").write_bytes(b"")
    (tmp_path / "stage1" / "metrics.jsonl").write_text('{"step": 20, "samples": 1280}\n')  # killed after it
    assert stage_progress(cfg, "stage1")[0].startswith("640/")
    assert stage_progress(cfg, "stage1", running=True)[0].startswith("1280/")


def test_tools_on_a_run_read_its_saved_config_under_explicit_overrides(tmp_path: Path) -> None:
    from tsvae_dist.cli import compose_for_run
    from tsvae_dist.pipeline.launcher import freeze_run

    freeze_run(compose([f"run_dir={tmp_path}", "stage1.epochs=2", "model.width=0.25", "seed=7"]))
    cfg = compose_for_run([f"run_dir={tmp_path}", "action=status", "stage2.epochs=3"])
    assert (cfg.stage1.epochs, cfg.model.width, cfg.seed, cfg.stage2.epochs, cfg.action) == (2, 0.25, 7, 3, "status")
    fresh = compose_for_run([f"run_dir={tmp_path / 'new'}", "stage1.epochs=5"])  # no saved config yet
    assert fresh.stage1.epochs == 5 and fresh.seed == 0


def test_an_object_store_run_keeps_its_submitit_logs_out_of_the_current_directory(tmp_path: Path) -> None:
    from tsvae_dist.pipeline.launcher import log_folder

    cfg = compose(["run_dir=s3://bucket/runs/x", f"eval.cache_dir={tmp_path / 'cache'}"])
    folder = log_folder(cfg)
    assert folder.startswith(str(tmp_path / "cache" / "logs" / "bucket_runs_x") + os.sep)
    assert not folder.startswith(os.path.join(os.getcwd(), "logs"))


def test_every_stage_job_runs_srun_with_kill_on_bad_exit(tmp_path: Path) -> None:
    """One task that exits non-zero ends the job's other tasks at once (not at a collective timeout)."""
    cfg = compose(["cluster=slurm", "nodes=2"])
    for stage in ("stage1", "evaluate"):
        script = stage_executor(cfg, stage, str(tmp_path))._make_submission_file_text("python -m job", "uid")
        srun = [line for line in script.splitlines() if line.startswith("srun ")]
        assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0].split(), script
