"""The Slurm launcher against the real local cluster (launch/dev_cluster.sh: 4 emulated CPU nodes,
partitions debug and urgent, accounting): four dependent jobs, a failure that cancels its dependents
and a re-run that submits only what is left, preemption and time limits that lose nothing, config
errors caught before anything is submitted."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.stagerun import REPO, env, load_model, run_stage, stage_command, tiny_overrides
from tsvae_dist.layout import STAGES

pytestmark = pytest.mark.slurm


JOB_NAMES = ",".join(f"tsvae-{s}" for s in STAGES)


def submit(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/submit.py", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def slurm(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def sacct(job_ids: list[str], fields: str, duplicates: bool = False) -> list[list[str]]:
    args = ["sacct", "--allocations", "--noheader", "--parsable2", f"--jobs={','.join(job_ids)}",
            f"--format={fields}"] + (["--duplicates"] if duplicates else [])
    return [line.split("|") for line in slurm(*args).splitlines()]


def wait_until(what: str, check: Callable[[], object], timeout: float, every: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


def submissions(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "slurm_jobs.json").read_text())["submissions"]


def stage_rows(status_stdout: str) -> dict[str, list[str]]:
    """`action=status` table rows by stage: [job, state, attempts, progress...]."""
    rows = {}
    for line in status_stdout.splitlines():
        words = line.split()
        if words and words[0] in STAGES:
            rows[words[0]] = words[1:]
    return rows


def test_config_errors_fail_before_anything_is_submitted(slurm_env: dict[str, str], tmp_path: Path) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    run_dir = tmp_path / "run"
    base = tiny_overrides(tmp_path / "data", run_dir, **{"stage1.loader.streams": 4, "stage2.loader.streams": 4})
    cases = [
        (["cluster=slurm", "nodes=0"], "cluster.nodes: must be >= 1"),
        (["cluster=slurm", "nodes=4", "cluster.partiton=debug"], "cluster.partiton"),  # a mistyped key
        (["cluster=dev", "nodes=4", "cluster.gpus_per_node=1"], "cluster.gpus_per_node: 1 GPU(s) requested"),
        # Checked against the live cluster (sinfo), still before the first sbatch:
        (["cluster=slurm", "nodes=4", "cluster.partition=nosuch"], "cluster.partition: 'nosuch' is not a partition"),
        (["cluster=slurm", "nodes=4", "cluster.gpus_per_node=1"], "cluster.gpus_per_node: stage1 asks for 1 GPU"),
        (["cluster=slurm", "nodes=4", "+cluster.stage_overrides.evaluate.nodes=5"],
         "cluster.stage_overrides.evaluate.nodes: evaluate asks for 5 nodes but partition debug has 4"),
    ]
    for overrides, message in cases:
        proc = submit([*base, *overrides])
        assert proc.returncode != 0, proc.stdout
        assert message in proc.stderr, (overrides, proc.stderr[-2000:])
        assert "submitted as Slurm job" not in proc.stdout
    assert not (run_dir / "slurm_jobs.json").exists()
    ours = slurm("sacct", "--allusers", "--allocations", "--noheader", "--parsable2", f"--starttime={since}",
                 f"--name={JOB_NAMES}", "--format=JobIDRaw,JobName,WorkDir")
    assert ours.strip() == "", f"jobs were submitted: {ours}"


def _flip_byte(path: Path) -> bytes:
    """Corrupt a shard in place (its SHA-256 no longer matches the manifest); returns the original bytes."""
    original = path.read_bytes()
    broken = bytearray(original)
    broken[len(broken) // 2] ^= 0xFF
    path.write_bytes(bytes(broken))
    return original


def test_pipeline_failure_cancels_dependents_and_rerun_submits_only_what_is_left(
        slurm_env: dict[str, str], tmp_path: Path) -> None:
    from tsvae_dist.cli import compose
    from tsvae_dist.data.datasets import ensure_dataset

    data, run_dir = tmp_path / "data", tmp_path / "run"
    command = [*tiny_overrides(data, run_dir, **{"stage1.loader.streams": 4, "stage2.loader.streams": 4}),
               "cluster=slurm", "nodes=4", "cluster.tasks_per_node=1", "cluster.poll_s=1",
               "+cluster.stage_overrides.evaluate.nodes=2"]  # evaluation on fewer nodes
    cfg = compose(command)
    manifest = ensure_dataset(cfg.dataset, cfg.dataset_root)
    train_shard = data / manifest["splits"]["train"]["shards"][3]["name"]
    test_shard = data / manifest["splits"]["test"]["shards"][1]["name"]

    # 1. A broken training shard: stage 1 fails, its three dependents end CANCELLED (not pending).
    original = _flip_byte(train_shard)
    first = submit(command)
    assert first.returncode != 0, first.stdout
    for stage in STAGES:
        assert re.search(rf"^{stage}: submitted as Slurm job \d+", first.stdout, re.M), first.stdout
    assert re.search(r"^stage1: job \d+ FAILED$", first.stdout, re.M), first.stdout
    for stage in ("encode", "stage2", "evaluate"):
        assert re.search(rf"^{stage}: job \d+ CANCELLED$", first.stdout, re.M), first.stdout
    assert "stage1: Slurm job" in first.stderr and "DataError" in first.stderr, first.stderr[-3000:]
    jobs = submissions(run_dir)[0]["jobs"]
    acct = {row[0]: row for row in sacct(list(jobs.values()), "JobIDRaw,State,Reason")}
    assert [acct[jobs[s]][1].split()[0] for s in STAGES] == ["FAILED", "CANCELLED", "CANCELLED", "CANCELLED"]
    for stage in STAGES[1:]:  # cancelled for their dependency: sacct's Reason, or else the controller's record
        shown = slurm("scontrol", "show", "job", jobs[stage])
        assert acct[jobs[stage]][2] == "Dependency" or "Dependency" in shown, shown

    # `action=status` names the failure and why the others were cancelled.
    status = submit([*command, "action=status"])
    assert status.returncode == 0, status.stderr
    rows = stage_rows(status.stdout)
    assert rows["stage1"][:2] == [jobs["stage1"], "FAILED"]
    # The job's exit code is its worst task's: 1 (the rank that raised) or 15 (the others, ended by srun's
    # --kill-on-bad-exit with SIGTERM); the cause is the rank that raised.
    assert re.search(r"stage1: FAILED \(exit (1|15):0\): rank \d: DataError: .*shard-", status.stdout), \
        status.stdout
    assert f"encode: dependency never satisfied: stage1 (job {jobs['stage1']}) ended FAILED" in status.stdout
    assert all(rows[s][1] == "CANCELLED" for s in ("encode", "stage2", "evaluate"))

    # 2. Fixed; now a broken test shard: stage 1 completes, encode fails, stage 2 and evaluate are cancelled.
    train_shard.write_bytes(original)
    original = _flip_byte(test_shard)
    second = submit(command)
    assert second.returncode != 0
    assert re.search(r"^stage1: job \d+ COMPLETED$", second.stdout, re.M), second.stdout
    assert re.search(r"^encode: job \d+ FAILED$", second.stdout, re.M), second.stdout
    assert "encode: Slurm job" in second.stderr

    # 3. Fixed: the same command submits only encode, stage 2 and evaluate, and finishes with the report.
    test_shard.write_bytes(original)
    third = submit(command)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "stage1: done, skipped" in third.stdout and "stage1: submitted" not in third.stdout
    assert third.stdout.strip().splitlines()[-1] == f"report: {run_dir / 'evaluate' / 'report.json'}"
    assert json.loads((run_dir / "evaluate" / "report.json").read_text())["test_images"] == 128
    last = submissions(run_dir)[-1]
    assert sorted(last["jobs"]) == ["encode", "evaluate", "stage2"]

    # Accounting: the three jobs were submitted together, each started only after the one it depends on
    # ended, and the scripts carry the afterok chain (evaluate on 2 nodes: its per-stage override).
    chain = [submissions(run_dir)[1]["jobs"]["stage1"], *(last["jobs"][s] for s in ("encode", "stage2", "evaluate"))]
    acct = {row[0]: row for row in sacct(chain, "JobIDRaw,State,Submit,Start,End,NNodes")}
    assert [acct[j][1] for j in chain] == ["COMPLETED"] * 4
    for before, after in itertools.pairwise(chain[1:]):
        assert acct[after][2] <= acct[before][3], "dependents are submitted with the chain, not after"
        assert acct[after][3] >= acct[before][4], "a dependent started before its dependency ended"
    assert [acct[j][5] for j in chain] == ["4", "4", "4", "2"]
    for before, after in itertools.pairwise(chain[1:]):  # needs AccountingStoreFlags=job_script (slurm.conf)
        script = slurm("sacct", "--batch-script", f"--jobs={after}")
        assert f"#SBATCH --dependency=afterok:{before}" in script and "--kill-on-invalid-dep=yes" in script, script

    # 4. Everything done: the same command submits nothing.
    fourth = submit(command)
    assert fourth.returncode == 0
    assert "submitted as Slurm job" not in fourth.stdout
    assert all(f"{s}: done, skipped" in fourth.stdout for s in STAGES)
    final = stage_rows(submit([*command, "action=status"]).stdout)
    assert [final[s][1] for s in STAGES] == ["COMPLETED"] * 4
    assert final["stage1"][3] == "1024/1024" and final["encode"][3] == "10/10"


def _events(log: Path) -> list[tuple[str, str, int]]:
    """("stop", signal, step) and ("resume", "", step) in the order rank 0 logged them."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if m := re.search(r"stage1: stopped by (SIG\w+) at step (\d+)", line):
            out.append(("stop", m.group(1), int(m.group(2))))
        elif m := re.search(r"stage1: resuming from \S+ at step (\d+)/", line):
            out.append(("resume", "", int(m.group(1))))
    return out


def test_stage1_survives_time_limit_signals_and_partition_preemption_bit_for_bit(
        slurm_env: dict[str, str], tmp_path: Path) -> None:
    """Stage 1 on 2 nodes with a 1-minute time limit: requeued by its time-limit signal, then stopped by
    USR1 twice and preempted once by a real higher-priority job, at random steps. Every stop commits a
    checkpoint at the step it stopped, every restart resumes there, the dependents wait throughout, and
    the final weights equal an uninterrupted run's bit for bit."""
    rng = random.Random()
    data = tmp_path / "data"
    extra = {"stage1.epochs": 30, "stage1.log_every_steps": 1, "stage1.checkpoint_every_steps": 1000}
    # The uninterrupted reference (world size 2, as the job), in the background while the job waits in queues.
    reference = tmp_path / "reference"
    ref = subprocess.Popen(stage_command("stage1", tiny_overrides(data, reference, **extra), nproc=2), cwd=REPO,
                           env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    run_dir = tmp_path / "run"
    command = [*tiny_overrides(data, run_dir, **extra), "cluster=dev", "nodes=2", "cluster.wait=false",
               "+cluster.stage_overrides.stage1.time_min=1", "+cluster.stage_overrides.stage1.signal_delay_s=15",
               "+cluster.stage_overrides.stage2.extra_sbatch={hold:true}"]  # stage 2 waits for us: see the end
    wait_until("the reference run to build the data set", lambda: (data / "manifest.json").exists(), 120)
    proc = submit(command)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = submissions(run_dir)[0]
    job, encode_job = record["jobs"]["stage1"], record["jobs"]["encode"]
    log = Path(record["log_folder"]) / f"{job}_0_log.err"
    metrics = run_dir / "stage1" / "metrics.jsonl"

    def step() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    def stops() -> list[tuple[str, int]]:
        return [(sig, s) for kind, sig, s in _events(log) if kind == "stop"] if log.exists() else []

    def running_again() -> bool:
        """Resumed after every stop so far, and trained a step since."""
        events = _events(log) if log.exists() else []
        n_stops = sum(kind == "stop" for kind, _, _ in events)
        return sum(kind == "resume" for kind, _, _ in events) == n_stops and step() > events[-1][2]

    # 1. The time limit: Slurm's USR2 (signal_delay_s before the limit) stops and requeues the job.
    wait_until("the time-limit signal", lambda: stops(), 120)
    assert stops()[0][0] == "SIGUSR2", stops()
    # 2.-3. Two USR1 notices and 4. one real preemption (SIGTERM), each a few steps after a restart. A
    # time-limit stop may come first (each attempt has a minute); then the notice is sent again.
    for expected in ("SIGUSR1", "SIGUSR1", "SIGTERM"):
        for _ in range(4):
            wait_until("the job to run again", running_again, 120, every=0.1)
            target = step() + rng.randint(1, 8)
            wait_until(f"step {target}", lambda t=target: step() >= t, 60, every=0.05)
            n = len(stops())
            if expected == "SIGUSR1":
                slurm("scancel", "--signal=USR1", job)
            else:  # every CPU of every node, in the partition that preempts debug
                slurm("sbatch", "--partition=urgent", "--nodes=4", "--ntasks-per-node=4", "--job-name=urgent",
                      f"--output={tmp_path / 'urgent.out'}", "--wrap=sleep 1")
            wait_until(f"the {expected} stop", lambda n=n: len(stops()) > n, 60)
            if stops()[n][0] == expected:
                break
        else:
            raise AssertionError(f"never stopped by {expected}: {stops()}")

    wait_until("stage 1 to finish", lambda: (run_dir / "stage1" / "MANIFEST.json").exists(), 240, every=0.5)
    # Nothing lost: every restart resumed at the very step its predecessor stopped.
    events = _events(log)
    for i, (kind, _, at) in enumerate(events):
        if kind == "stop":
            assert events[i + 1] == ("resume", "", at), events
    wait_until("stage 1's job to end", lambda: sacct([job], "JobIDRaw,State")[0][1] == "COMPLETED", 30)
    states = [row[1].split()[0] for row in sacct([job], "JobIDRaw,State", duplicates=True)]
    assert states.count("REQUEUED") >= 3 and states.count("PREEMPTED") >= 1 and states[-1] == "COMPLETED", states
    # The dependents waited throughout (a requeue is not a failure): encode runs now. Stage 2 was
    # submitted on hold (extra_sbatch), so `action=cancel` has two queued jobs to cancel.
    wait_until("encode to complete", lambda: sacct([encode_job], "JobIDRaw,State")[0][1] == "COMPLETED", 60)
    cancel = submit([*command, "action=cancel"])
    assert cancel.returncode == 0, cancel.stderr
    for stage in ("stage2", "evaluate"):
        assert f"{stage}: cancelled Slurm job {record['jobs'][stage]}" in cancel.stdout, cancel.stdout
    assert "encode: cancelled" not in cancel.stdout
    status = submit([*command, "action=status"])
    rows = stage_rows(status.stdout)
    assert [rows[s][1] for s in STAGES] == ["COMPLETED", "COMPLETED", "CANCELLED", "CANCELLED"], status.stdout
    assert rows["stage1"][2] == str(len(states))  # attempts, from accounting

    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    a, b = load_model(reference / "stage1" / "model.pt"), load_model(run_dir / "stage1" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def test_stage1_on_four_nodes_resumes_from_usr1_bit_for_bit(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """Stage 1 on all 4 nodes (4 ranks: a gradient sum whose order a restart could change shows only with
    3 or more), stopped by one USR1 at a random step: requeued, resumed at that step, and its final
    weights and metrics equal a 4-rank torchrun run's bit for bit."""
    data = tmp_path / "data"
    extra = {"stage1.epochs": 6, "stage1.log_every_steps": 1, "stage1.checkpoint_every_steps": 1000,
             "stage1.loader.streams": 4}
    reference = tmp_path / "reference"
    ref = subprocess.Popen(stage_command("stage1", tiny_overrides(data, reference, **extra), nproc=4), cwd=REPO,
                           env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "run"
    command = [*tiny_overrides(data, run_dir, **extra), "cluster=dev", "nodes=4", "cluster.wait=false",
               "+cluster.stage_overrides.stage2.nodes=1",  # its 2 loader streams fit 2 ranks
               "+cluster.stage_overrides.encode.extra_sbatch={hold:true}"]  # the dependents wait; cancelled below
    wait_until("the reference run to build the data set", lambda: (data / "manifest.json").exists(), 120)
    proc = submit(command)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = submissions(run_dir)[0]
    job = record["jobs"]["stage1"]
    log = Path(record["log_folder"]) / f"{job}_0_log.err"
    metrics = run_dir / "stage1" / "metrics.jsonl"

    def step() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    target = random.Random().randint(3, 20)
    wait_until(f"step {target}", lambda: step() >= target, 240, every=0.05)
    slurm("scancel", "--signal=USR1", job)
    wait_until("stage 1 to finish", lambda: (run_dir / "stage1" / "MANIFEST.json").exists(), 300, every=0.5)
    events = _events(log)
    assert [e[0] for e in events] == ["stop", "resume"] and events[0][1] == "SIGUSR1", events
    assert events[1][2] == events[0][2], events  # resumed at the step it stopped
    cancel = submit([*command, "action=cancel"])
    assert cancel.returncode == 0, cancel.stderr

    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    a, b = load_model(reference / "stage1" / "model.pt"), load_model(run_dir / "stage1" / "model.pt")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from the uninterrupted run: {differ[:5]}"
    lines = [[{k: v for k, v in json.loads(ln).items() if k != "samples_per_s"}
              for ln in (d / "stage1" / "metrics.jsonl").read_text().splitlines()] for d in (reference, run_dir)]
    assert lines[0] == lines[1]


def test_torchrun_runs_a_stage_with_the_same_config(tmp_path: Path) -> None:
    """Without Slurm: `torchrun --nproc_per_node=2 -m tsvae_dist.encode` with the cluster config unchanged."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = [*tiny_overrides(data, run_dir, **{"stage1.epochs": 1}), "cluster=slurm", "nodes=2"]
    run_stage("stage1", overrides, nproc=2)
    run_stage("encode", overrides, nproc=2)
    latents = json.loads((run_dir / "encode" / "latents" / "manifest.json").read_text())
    assert latents["splits"]["train"]["count"] == 512 and latents["splits"]["test"]["count"] == 128


def test_two_seeds_run_as_parallel_chains_then_the_aggregate_and_a_rerun_submits_nothing(
        slurm_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [*tiny_overrides(tmp_path / "data", run_dir, seeds=2, seed=5, **{
        "stage1.epochs": 1, "stage2.epochs": 1, "eval.fid": "off"}),
        "cluster=slurm", "nodes=1", "cluster.tasks_per_node=1", "cluster.poll_s=1"]
    first = submit(command, timeout=1200)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]

    # One chain per seed, each stage afterok on the one before; both chains submitted before any is followed.
    chains = [submissions(run_dir / f"seed-{k}")[0]["jobs"] for k in range(2)]
    for jobs in chains:
        assert list(jobs) == list(STAGES)
        for before, stage in itertools.pairwise(STAGES):  # the sbatch dependency each job was submitted with
            assert re.search(rf"^{stage}: submitted as Slurm job {jobs[stage]} \(.*, afterok:{jobs[before]}\)$",
                             first.stdout, re.M), first.stdout
    assert first.stdout.index(f"job {chains[1]['stage1']}") < first.stdout.index("following")
    # The aggregate waits on both chains' last jobs.
    agg_jobs = submissions(run_dir)[0]["jobs"]
    assert list(agg_jobs) == ["aggregate"]
    line = re.search(rf"^aggregate: submitted as Slurm job {agg_jobs['aggregate']} .*$", first.stdout, re.M)
    assert line and f"afterok:{chains[0]['evaluate']}:{chains[1]['evaluate']}" in line.group(0), first.stdout
    states = {row[0]: row[1].split()[0] for row in
              sacct([j for jobs in chains for j in jobs.values()] + [agg_jobs["aggregate"]], "JobIDRaw,State")}
    assert set(states.values()) == {"COMPLETED"}, states
    # The two chains overlapped: seed-1's stage 1 started before seed-0's evaluate ended.
    times = {row[0]: row[1:] for row in sacct([chains[0]["evaluate"], chains[1]["stage1"]], "JobIDRaw,Start,End")}
    assert times[chains[1]["stage1"]][0] < times[chains[0]["evaluate"]][1], times

    # Both seeds' runs, with their seeds, and the aggregate's mean ± std over them.
    reports = [json.loads((run_dir / f"seed-{k}" / "evaluate" / "report.json").read_text()) for k in range(2)]
    assert [r["run_dir"] for r in reports] == [str(run_dir / f"seed-{k}") for k in range(2)]
    agg = json.loads((run_dir / "aggregate" / "report.json").read_text())
    assert agg["seeds"] == [5, 6]
    gammas = [r["gamma_x"] for r in reports]
    assert agg["metrics"]["gamma_x"]["mean"] == pytest.approx(sum(gammas) / 2)
    assert agg["metrics"]["gamma_x"]["std"] == pytest.approx(abs(gammas[0] - gammas[1]) / 2 ** 0.5)
    assert "± " in (run_dir / "aggregate" / "report.md").read_text()

    # status lists every seed's stages and the aggregate.
    status = submit([*command, "action=status"])
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("COMPLETED") == 9, status.stdout

    # A re-run submits nothing: every seed and the aggregate are done.
    again = submit(command)
    assert again.returncode == 0, again.stderr
    assert "submitted as Slurm job" not in again.stdout, again.stdout
    assert "seed-0 (seed 5): done, skipped" in again.stdout and "aggregate: done, skipped" in again.stdout
    assert len(submissions(run_dir)) == 1 and all(len(submissions(run_dir / f"seed-{k}")) == 1 for k in range(2))
