"""A rank that raises ends every rank of its stage within seconds, and the launcher's error names that
rank: locally (3 processes) and on the local Slurm (3 nodes, srun --kill-on-bad-exit). The fault is a
real one: an undecodable image in a shard (its manifest hash updated, so only decoding finds it) that
only rank 1 reads, several steps into training."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.stagerun import REPO, env, tiny_overrides

# 3 ranks, 3 streams: stream k is rank k's; shard 4 is stream 1's second shard, so rank 1 meets its
# sample 40 about 13 steps in (past the first step: the short collective timeout is in force).
BAD_SHARD, BAD_SAMPLE = 4, 40
THREE_RANKS = {"stage1.batch_size": 24, "stage1.loader.streams": 3, "stage2.batch_size": 24,
               "stage2.loader.streams": 3, "stage1.epochs": 1}


def _undecodable_sample(data: Path, overrides: list[str]) -> str:
    """Build the dataset, zero one image's bytes in place and update the shard's hash; the sample's key."""
    from tsvae_dist.cli import compose
    from tsvae_dist.data.datasets import ensure_dataset

    cfg = compose(overrides)
    manifest = ensure_dataset(cfg.dataset, cfg.dataset_root)
    entry = manifest["splits"]["train"]["shards"][BAD_SHARD]
    shard = data / entry["name"]
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[BAD_SAMPLE]
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data:member.offset_data + member.size] = bytes(member.size)
    shard.write_bytes(bytes(raw))
    entry["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    return member.name.rsplit(".", 1)[0]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines[0]


def test_a_rank_that_raises_ends_the_local_stage_within_seconds_and_is_named(tmp_path: Path) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = [*tiny_overrides(data, run_dir, **THREE_RANKS), "cluster.tasks_per_node=3"]
    key = _undecodable_sample(data, overrides)
    proc = subprocess.run([sys.executable, "launch/submit.py", *overrides], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = _error_line(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.fullmatch(rf"error: stage1: rank 1: DataError: .*shard-00000{BAD_SHARD}\.tar: sample '{key}': "
                        r"undecodable \.png .*\(log: .*_1_log\.err\)", line), line
    # The fault came after training steps, and everything ended within seconds of it (not a timeout).
    assert json.loads((run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= 4
    folder = Path(line.rsplit("(log: ", 1)[1][:-1]).parent
    raised = next(folder.glob("*_1_result.pkl")).stat().st_mtime  # submitit writes it as rank 1 raises
    assert ended - raised < 60, f"the launcher returned {ended - raised:.0f} s after rank 1 raised"


def _raise_on_rank_1_others_wait() -> str:
    """Rank 1 raises; the others stay alive as a rank stuck in a collective with it would (NCCL, a
    process that lingers after its exception), for far longer than the test allows."""
    if os.environ["SUBMITIT_LOCAL_GLOBALID"] == "1":
        raise ValueError("rank 1 broke")
    time.sleep(300)
    return "never"


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_the_local_launcher_ends_ranks_left_waiting_once_one_raised(tmp_path: Path, sigint: str) -> None:
    """Also when the launcher runs as a background job of a non-interactive shell: its children, submitit's
    controller included, inherit an ignored SIGINT, so a cancel through submitit (a SIGINT) would do
    nothing."""
    import submitit

    from tsvae_dist.cli import compose
    from tsvae_dist.pipeline import follow, launcher

    executor = submitit.LocalExecutor(folder=str(tmp_path))
    executor.update_parameters(tasks_per_node=3, nodes=1, timeout_min=10)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        job = executor.submit(_raise_on_rank_1_others_wait)  # the controller inherits the disposition
    finally:
        signal.signal(signal.SIGINT, previous)
    started = time.monotonic()
    launcher._watch_local(compose([f"run_dir={tmp_path / 'run'}"]), "stage1", job, str(tmp_path), 3)
    took = time.monotonic() - started
    assert job.done() and took < 60, took  # the grace, then the kill
    what, where = follow.log_cause(str(tmp_path), job.job_id)
    assert what == "rank 1: ValueError: rank 1 broke" and where.endswith(f"{job.job_id}_1_log.err")


def _all_reduce_world() -> float:
    import submitit
    import torch

    from tsvae_dist.runtime import dist

    # As StageTask does.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    dist.init(use_gpu=False, timeout_s=60)
    total = dist.all_reduce_sum(torch.ones(1))
    dist.shutdown()
    return float(total)


def test_local_ranks_meet_without_a_port_so_a_taken_port_does_not_matter(tmp_path: Path) -> None:
    """submitit gives a local job MASTER_PORT from the environment, else a port drawn from its pid, which
    any process on the machine may hold (seen in CI: EADDRINUSE); the launcher's jobs meet through a
    file instead. Here the port is taken on purpose, and the user's shell exports it."""
    import socket

    from tsvae_dist.cli import compose
    from tsvae_dist.pipeline import launcher

    cfg = compose([f"run_dir={tmp_path / 'run'}", "cluster.tasks_per_node=3", "stage1.batch_size=48",
                   "stage2.batch_size=48"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        os.environ["MASTER_PORT"] = str(taken.getsockname()[1])
        try:
            job = launcher.submit_local(cfg, "stage1", str(tmp_path), _all_reduce_world)
        finally:
            del os.environ["MASTER_PORT"]
        deadline = time.monotonic() + 120  # failing here: the peers of a rank that could not listen wait on
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not job.done():
            launcher._kill_tasks(job)
        assert job.done() and job.results() == [3.0, 3.0, 3.0], job.stderr()
    assert not list(tmp_path.glob("rendezvous-*")), "the rendezvous file is left behind"


@pytest.mark.slurm
def test_a_rank_that_raises_ends_the_slurm_job_within_seconds_and_is_named(
        slurm_env: dict[str, str], tmp_path: Path) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = [*tiny_overrides(data, run_dir, **THREE_RANKS), "cluster=slurm", "nodes=3",
                 "cluster.tasks_per_node=1", "cluster.poll_s=1"]
    key = _undecodable_sample(data, overrides)
    proc = subprocess.run([sys.executable, "launch/submit.py", *overrides], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = _error_line(proc)
    assert re.fullmatch(rf"error: stage1: Slurm job \d+ FAILED: FAILED \(exit \d+:\d+\): rank 1: DataError: "
                        rf".*shard-00000{BAD_SHARD}\.tar: sample '{key}': undecodable \.png .*", line), line
    job = json.loads((run_dir / "slurm_jobs.json").read_text())["submissions"][0]["jobs"]["stage1"]
    script = subprocess.run(["sacct", "--batch-script", f"--jobs={job}"], capture_output=True, text=True,
                            env=env(), timeout=60).stdout
    assert re.search(r"^srun .*--kill-on-bad-exit=1", script, re.M), script
    # The job's tasks all ended within seconds of rank 1's error (not at a collective timeout).
    fields = subprocess.run(["sacct", "--noheader", "--parsable2", f"--jobs={job}", "--format=JobID,Start,End"],
                            capture_output=True, text=True, env=env(), timeout=60).stdout
    steps = {row.split("|")[0]: row.split("|")[1:] for row in fields.splitlines()}
    step = next(v for k, v in steps.items() if re.fullmatch(rf"{job}\.0", k))
    assert json.loads((run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= 4
    folder = Path(json.loads((run_dir / "slurm_jobs.json").read_text())["submissions"][0]["log_folder"])
    raised = (folder / f"{job}_1_result.pkl").stat().st_mtime
    end = time.mktime(time.strptime(step[1], "%Y-%m-%dT%H:%M:%S"))
    assert end - raised < 60, f"the job step ended {end - raised:.0f} s after rank 1 raised ({step})"
