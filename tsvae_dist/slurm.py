"""Slurm: the pipeline's remaining stages as dependent jobs, followed to the end; status and cancel.

`run_slurm` checks every stage's request against the live cluster (partition, nodes, CPUs and GPUs
per node) before it submits anything, then submits the stages at once through submitit, each
`afterok` on the one before and with `--kill-on-invalid-dep=yes`, so a failed stage cancels its
dependents instead of leaving them pending forever. The job ids go to `<run_dir>/slurm_jobs.json`;
with `cluster.wait` the launcher then follows the jobs through Slurm accounting (sacct) until the
report exists or a stage fails. Every cluster fact comes from `cluster.*` (conf/cluster/*.yaml).

Inside a job, `requeue_current_job` is how a stage stopped by USR1/USR2 (a time limit ahead, or a
preemption notice) puts itself back in the queue; a partition preemption (TERM) is requeued by
Slurm itself. A requeued job runs the same pickled task again, which resumes from its checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tsvae_dist import manifest, storage
from tsvae_dist.config import STAGES, ClusterConfig, RunConfig, stage_cluster, to_container
from tsvae_dist.errors import ConfigError

if TYPE_CHECKING:
    from tsvae_dist.launcher import PlannedStage

TRAINING_STAGES = ("stage1", "stage2")  # progress in samples (the others: shards, the report)
JOBS_FILE = "slurm_jobs.json"  # in run_dir: every submission of the run, with its job ids and log folder
# Job states from which a job may still run (sacct shows a requeued job as PENDING again).
ACTIVE_STATES = frozenset({
    "SUBMITTED",  # ours: submitted, not yet in accounting
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
    "STAGE_OUT", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
})  # PREEMPTED is not: a requeued job is back in the queue; one preempted for good is not
# Lines of a task's error log that report a lost peer, not the cause: another rank's failure.
_PEER_LOSS = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "Broken pipe")
ACCOUNTING_PATIENCE_S = 300  # how long `follow` keeps retrying while Slurm accounting does not answer
_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")
_CKPT = re.compile(r"^ckpt-(\d{12})\.pt$")


class SlurmError(RuntimeError):
    """A Slurm command failed (the message holds the command and its error output)."""


class StageFailed(RuntimeError):
    """A stage's job ended without finishing the stage (failed, cancelled, timed out)."""


@dataclass
class Partition:
    name: str  # partition name
    default: bool  # the cluster's default partition
    nodes: int  # nodes in the partition
    cpus_per_node: int  # the most CPUs a node of the partition has
    gpus_per_node: int  # the most GPUs (gres gpu) a node of the partition has


@dataclass
class JobRecord:
    job_id: str  # Slurm job id
    state: str  # accounting state of the latest attempt (first word: "CANCELLED by 0" -> CANCELLED)
    exit_code: str  # "code:signal" of the latest attempt
    reason: str  # Slurm's reason field (why pending, or why it ended)
    start: str  # start of the latest attempt (ISO time or "Unknown")
    end: str  # end of the latest attempt
    attempts: int  # 1 + the number of requeues seen by accounting


def _slurm(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError(f"cluster.name: slurm, but `{args[0]}` is not on PATH (no Slurm client here)") \
            from None
    if check and proc.returncode != 0:
        raise SlurmError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# --- Checks against the live cluster, before anything is submitted --------------------------------------


def partitions() -> dict[str, Partition]:
    """The cluster's partitions as sinfo reports them (one line per partition and node state)."""
    out = _slurm(["sinfo", "--noheader", "--format=%P|%D|%c|%G"]).stdout
    parts: dict[str, Partition] = {}
    for line in out.splitlines():
        name, nodes, cpus, gres = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = max([int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)] or [0])
        p = parts.setdefault(name, Partition(name, default, 0, 0, 0))
        p.nodes += int(nodes)
        p.cpus_per_node = max(p.cpus_per_node, int(re.sub(r"\D", "", cpus) or 0))
        p.gpus_per_node = max(p.gpus_per_node, gpus)
    return parts


def _setting(cluster: ClusterConfig, stage: str, key: str) -> str:
    """The config path a user changes to fix `key` of `stage`: its override if it has one."""
    if key in (cluster.stage_overrides.get(stage) or {}):
        return f"cluster.stage_overrides.{stage}.{key}"
    return f"cluster.{key}"


def check_cluster(cfg: RunConfig, stages: Sequence[str], parts: dict[str, Partition]) -> None:
    """Raise ConfigError naming the setting when a stage asks for more than its partition has."""
    for stage in stages:
        c = stage_cluster(cfg.cluster, stage)
        name = c.partition or next((p.name for p in parts.values() if p.default), "")
        if not name:
            raise ConfigError(f"{_setting(cfg.cluster, stage, 'partition')}: this cluster has no default "
                              f"partition; choose one of {sorted(parts)}")
        if name not in parts:
            raise ConfigError(f"{_setting(cfg.cluster, stage, 'partition')}: {name!r} is not a partition of "
                              f"this Slurm cluster; choose one of {sorted(parts)}")
        p = parts[name]
        if c.nodes > p.nodes:
            raise ConfigError(f"{_setting(cfg.cluster, stage, 'nodes')}: {stage} asks for {c.nodes} nodes "
                              f"but partition {name} has {p.nodes}")
        if c.tasks_per_node * c.cpus_per_task > p.cpus_per_node:
            raise ConfigError(
                f"{_setting(cfg.cluster, stage, 'tasks_per_node')}: {stage} asks for {c.tasks_per_node} "
                f"task(s) x {c.cpus_per_task} CPU(s) per node but the nodes of partition {name} have "
                f"{p.cpus_per_node} CPUs"
            )
        if c.gpus_per_node > p.gpus_per_node:
            raise ConfigError(f"{_setting(cfg.cluster, stage, 'gpus_per_node')}: {stage} asks for "
                              f"{c.gpus_per_node} GPU(s) per node but the nodes of partition {name} have "
                              f"{p.gpus_per_node}")


# --- Submission ------------------------------------------------------------------------------------


def stage_executor(cfg: RunConfig, stage: str, folder: str, dependency: str | None = None):
    """A submitit Slurm executor with the stage's sbatch options, all taken from `cluster.*`."""
    import submitit

    c = stage_cluster(cfg.cluster, stage)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=c.max_requeues)
    params: dict = {
        "job_name": f"tsvae-{stage}",
        "nodes": c.nodes,
        "ntasks_per_node": c.tasks_per_node,  # one task per GPU (validate() checks the two agree)
        "cpus_per_task": c.cpus_per_task,
        "time": c.time_min,
        "signal_delay_s": c.signal_delay_s,  # submitit sends USR2 this long before the time limit
    }
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos, "constraint": c.constraint}
    params.update({k: v for k, v in optional.items() if v})
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb:
        params["mem"] = f"{c.mem_gb}GB"
    if c.setup:
        params["setup"] = list(c.setup)
    # --requeue: a preempted job goes back to the queue whatever the cluster's JobRequeue default is.
    extra: dict = {"requeue": True, "kill-on-invalid-dep": "yes"}
    if dependency:
        extra["dependency"] = dependency
    extra.update(c.extra_sbatch)
    params["additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def _read_record(cfg: RunConfig) -> dict:
    url = storage.join(cfg.run_dir, JOBS_FILE)
    return json.loads(storage.read_text(url)) if storage.exists(url) else {"submissions": []}


def _write_record(cfg: RunConfig, record: dict) -> None:
    storage.write_text_atomic(storage.join(cfg.run_dir, JOBS_FILE), json.dumps(record, indent=2) + "\n")


def latest_jobs(cfg: RunConfig) -> dict[str, tuple[str, str]]:
    """stage -> (job id, log folder) of the stage's most recent submission in this run."""
    out: dict[str, tuple[str, str]] = {}
    for submission in _read_record(cfg)["submissions"]:
        for stage, job_id in submission["jobs"].items():
            out[stage] = (job_id, submission["log_folder"])
    return out


def _refuse_duplicates(cfg: RunConfig, stages: Sequence[str]) -> None:
    """A stage of this run that is still queued or running must not be submitted a second time."""
    jobs = {s: j for s, (j, _) in latest_jobs(cfg).items() if s in stages}
    if not jobs:
        return
    acct = accounting(list(jobs.values()))
    for stage, job_id in jobs.items():
        rec = acct.get(job_id)
        if rec is not None and rec.state in ACTIVE_STATES:
            raise ConfigError(f"run_dir: {stage} of {cfg.run_dir} is still {rec.state} as Slurm job "
                              f"{job_id}; follow it with action=status, or stop it with action=cancel "
                              "before submitting again")


def submit_stages(cfg: RunConfig, stages: Sequence[str], folder: str) -> dict[str, str]:
    """Submit `stages` (in pipeline order) as a chain of afterok jobs; returns stage -> job id."""
    from tsvae_dist.jobs import StageTask

    config = to_container(cfg)
    jobs: dict[str, str] = {}
    previous = None
    try:
        for stage in stages:
            dependency = f"afterok:{previous}" if previous else None
            job = stage_executor(cfg, stage, folder, dependency).submit(StageTask(stage, config))
            jobs[stage] = previous = str(job.job_id)
            c = stage_cluster(cfg.cluster, stage)
            where = f"partition {c.partition}" if c.partition else "default partition"
            after = f", {dependency}" if dependency else ""
            print(f"{stage}: submitted as Slurm job {job.job_id} ({c.nodes} node(s) x {c.tasks_per_node} "
                  f"task(s), {where}{after})", flush=True)
    except Exception:
        if jobs:  # all or nothing: a half-submitted chain would run stages nobody follows
            _slurm(["scancel", *jobs.values()], check=False)
            print(f"submission failed: cancelled jobs {', '.join(jobs.values())}", flush=True)
        raise
    return jobs


def run_slurm(cfg: RunConfig, planned: Sequence[PlannedStage]) -> None:
    """Submit the stages that are not done as dependent jobs; with `cluster.wait`, follow them to the end."""
    for s in planned:
        if s.done:
            print(f"{s.name}: done, skipped")
    todo = [s.name for s in planned if not s.done]
    if not todo:
        return
    check_cluster(cfg, todo, partitions())
    _refuse_duplicates(cfg, todo)

    from tsvae_dist.launcher import log_folder

    folder = log_folder(cfg)  # fresh per submission: a reused folder can return a stale result
    jobs = submit_stages(cfg, todo, folder)
    record = _read_record(cfg)
    record["submissions"].append({
        "submitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "log_folder": folder, "jobs": jobs,
    })
    _write_record(cfg, record)
    print(f"logs: {folder}")
    print(f"artifacts: {cfg.run_dir}", flush=True)
    if not cfg.cluster.wait:
        print("not waiting (cluster.wait=false): run the same command with action=status to follow the jobs")
        return
    try:
        follow(cfg, jobs, folder)
    except KeyboardInterrupt:
        print("\nstopped following; the jobs go on: the same command with action=status shows them, "
              "action=cancel cancels them", flush=True)
        raise


# --- Following, status and cancel -------------------------------------------------------------------------


def accounting(job_ids: Sequence[str]) -> dict[str, JobRecord]:
    """Each job's latest attempt: the queue's view while Slurm holds the job, else accounting's.

    Jobs neither queued nor (yet) in accounting are absent.
    """
    if not job_ids:
        return {}
    fields = "JobIDRaw,State,ExitCode,Reason,Start,End"
    proc = _slurm(["sacct", "--allocations", "--duplicates", "--noheader", "--parsable2",
                   f"--jobs={','.join(job_ids)}", f"--format={fields}"], check=False)
    if proc.returncode != 0:
        raise SlurmError(f"sacct failed ({proc.stderr.strip()}); following jobs needs Slurm accounting "
                         "(slurmdbd)")
    out: dict[str, JobRecord] = {}
    for line in proc.stdout.splitlines():
        job_id, state, exit_code, reason, start, end = line.split("|")
        attempts = out[job_id].attempts + 1 if job_id in out else 1
        # --duplicates lists a requeued job once per attempt, oldest first: the last line is current.
        state = state.split()[0] if state else "UNKNOWN"
        out[job_id] = JobRecord(job_id, state, exit_code, reason, start, end, attempts)
    # Accounting lags the controller by a moment; the queue is current for jobs it still holds.
    queue = _slurm(["squeue", "--noheader", f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r"], check=False)
    for line in queue.stdout.splitlines():
        job_id, state, reason = line.strip().split("|")
        if job_id in out:
            out[job_id].state, out[job_id].reason = state, reason
        else:
            out[job_id] = JobRecord(job_id, state, "", reason, "", "", 1)
    return out


def _train_total(cfg: RunConfig, stage: str) -> int | None:
    """Samples a training stage consumes in total (epochs x whole global batches per epoch)."""
    from tsvae_dist.shardformat import read_manifest

    try:
        count = read_manifest(cfg.dataset_root)["splits"]["train"]["count"]
    except Exception:  # status must work whatever state the dataset is in
        return None
    train = getattr(cfg, stage)
    return train.epochs * (count // train.batch_size) * train.batch_size


def stage_progress(cfg: RunConfig, stage: str) -> tuple[str, str]:
    """(progress, last checkpoint) of a stage, read from its artifacts: samples, shards or the report."""
    directory = manifest.stage_dir(cfg, stage)
    done = manifest.is_done(cfg, stage)
    if stage in TRAINING_STAGES:
        total = _train_total(cfg, stage)
        ckpts = sorted((int(m.group(1)), n) for n in storage.listdir(storage.join(directory, "checkpoints"))
                       if (m := _CKPT.match(n)))
        seen = ckpts[-1][0] if ckpts else 0
        metrics = storage.join(directory, "metrics.jsonl")
        if storage.exists(metrics):
            lines = storage.read_text(metrics).strip().splitlines()
            if lines:
                seen = max(seen, int(json.loads(lines[-1]).get("samples", 0)))
        if done and total is not None:
            seen = total
        last = storage.join(directory, "checkpoints", ckpts[-1][1]) if ckpts else "-"
        return f"{seen}/{total if total is not None else '?'} samples", last
    if stage == "encode":
        from tsvae_dist.shardformat import read_manifest

        try:
            splits = read_manifest(cfg.dataset_root)["splits"]
            total = sum(len(splits[s]["shards"]) for s in ("train", "test"))
        except Exception:
            total = None
        latents = storage.join(directory, "latents")
        finished = sum(n.endswith(".done") for s in ("train", "test")
                       for n in storage.listdir(storage.join(latents, s)))
        return f"{finished}/{total if total is not None else '?'} shards", "-"
    return ("report written" if done else "-"), "-"


def _exception_line(text: str) -> str | None:
    """The final exception line of the last Python traceback in a log, if any."""
    # torch.distributed prefixes the lines of an uncaught exception with "[rankN]: ".
    lines = [_RANK_PREFIX.sub("", ln, count=1) for ln in text.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    for ln in lines[starts[-1] + 1:]:
        if ln and not ln[0].isspace() and not ln.startswith("srun:"):
            return ln.strip()
    return None


def log_error(folder: str, job_id: str) -> str | None:
    """The exception that ended a job, from its tasks' error logs; a cause beats another rank's lost peer."""
    found = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(f"{job_id}_") and name.endswith("_log.err"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    line = _exception_line(f.read())
                if line:
                    found.append(line)
    causes = [ln for ln in found if not any(p in ln for p in _PEER_LOSS)]
    return (causes or found or [None])[0]


def failure_reason(rec: JobRecord, folder: str, previous: tuple[str, JobRecord] | None) -> str:
    """Why a job ended without success, in one line."""
    error = log_error(folder, rec.job_id)
    if rec.state == "CANCELLED" and previous is not None and previous[1].state not in ("COMPLETED",):
        stage, prev = previous
        return f"dependency never satisfied: {stage} (job {prev.job_id}) ended {prev.state}"
    if rec.state == "CANCELLED":
        return "cancelled (scancel, action=cancel, or an administrator)"
    if rec.state == "TIMEOUT":
        return f"reached its time limit without requeueing itself{': ' + error if error else ''}"
    detail = error or (f"reason {rec.reason}" if rec.reason not in ("", "None") else "no error in the logs")
    return f"{rec.state} (exit {rec.exit_code}): {detail}"


def stage_rows(cfg: RunConfig) -> list[dict[str, str]]:
    """One row per stage: job, state, attempts, progress, last checkpoint and, on failure, the reason."""
    jobs = latest_jobs(cfg)
    acct = accounting([j for j, _ in jobs.values()])
    rows, previous = [], None
    for stage in STAGES:
        progress, ckpt = stage_progress(cfg, stage)
        row = {"stage": stage, "job": "-", "state": "not submitted", "attempts": "-", "progress": progress,
               "checkpoint": ckpt, "reason": ""}
        if stage in jobs:
            job_id, folder = jobs[stage]
            rec = acct.get(job_id, JobRecord(job_id, "UNKNOWN", "", "not in Slurm's queue or accounting", "", "",
                                             0))
            row.update(job=job_id, state=rec.state, attempts=str(rec.attempts))
            if rec.state not in ACTIVE_STATES and rec.state != "COMPLETED":
                row["reason"] = failure_reason(rec, folder, previous)
            elif rec.state == "PENDING" and rec.reason not in ("", "None"):
                row["reason"] = f"pending: {rec.reason}"
            previous = (stage, rec)
        elif manifest.is_done(cfg, stage):
            row["state"] = "done"
        rows.append(row)
    return rows


def format_status(cfg: RunConfig, rows: list[dict[str, str]]) -> str:
    cols = ("stage", "job", "state", "attempts", "progress", "checkpoint")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = [f"run_dir: {cfg.run_dir}", "  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
        if r["reason"]:
            lines.append(f"  {r['stage']}: {r['reason']}")
    return "\n".join(lines)


def follow(cfg: RunConfig, jobs: dict[str, str], folder: str) -> None:
    """Poll accounting until every job completed (return) or one failed and its dependents ended (raise)."""
    order = [s for s in STAGES if s in jobs]
    seen: dict[str, tuple[str, int]] = {}
    shown_progress: dict[str, str] = {}
    failed_at: float | None = None
    last_progress = 0.0
    acct_down_since: float | None = None
    started = time.monotonic()
    while True:
        try:
            acct = accounting(list(jobs.values()))
            acct_down_since = None
        except SlurmError as e:  # slurmdbd restarting: the jobs run on; give it a few minutes
            acct_down_since = acct_down_since or time.monotonic()
            if time.monotonic() - acct_down_since > ACCOUNTING_PATIENCE_S:
                raise
            print(f"warning: {e}; retrying", flush=True)
            time.sleep(max(cfg.cluster.poll_s, 5.0))
            continue
        # Not yet visible anywhere just after submission; still invisible a minute later means lost.
        lost = "SUBMITTED" if time.monotonic() - started < 60 else "UNKNOWN"
        recs = {s: acct.get(jobs[s], JobRecord(jobs[s], lost, "", "", "", "", 0)) for s in order}
        for s, rec in recs.items():
            if seen.get(s) != (rec.state, rec.attempts):
                again = f" (attempt {rec.attempts})" if rec.attempts > 1 else ""
                print(f"{s}: job {rec.job_id} {rec.state}{again}", flush=True)
                seen[s] = (rec.state, rec.attempts)
        now = time.monotonic()
        if now - last_progress >= max(10.0, cfg.cluster.poll_s):
            last_progress = now
            for s, rec in recs.items():
                if rec.state == "RUNNING":
                    progress, ckpt = stage_progress(cfg, s)
                    if shown_progress.get(s) != progress:
                        shown_progress[s] = progress
                        tail = f", last checkpoint {ckpt}" if ckpt != "-" else ""
                        print(f"{s}: {progress}{tail}", flush=True)
        states = [rec.state for rec in recs.values()]
        if all(st == "COMPLETED" for st in states):
            break
        bad = [s for s in order if recs[s].state not in ACTIVE_STATES and recs[s].state != "COMPLETED"]
        if bad:
            failed_at = failed_at or now
            settled = all(recs[s].state not in ACTIVE_STATES for s in order[order.index(bad[0]):])
            if settled or now - failed_at > 60:  # dependents should end at once (kill-on-invalid-dep)
                print(format_status(cfg, stage_rows(cfg)), flush=True)
                first = recs[bad[0]]
                previous = (order[order.index(bad[0]) - 1], recs[order[order.index(bad[0]) - 1]]) \
                    if order.index(bad[0]) > 0 else None
                raise StageFailed(f"{bad[0]}: Slurm job {first.job_id} {first.state}: "
                                  f"{failure_reason(first, folder, previous)}")
        time.sleep(cfg.cluster.poll_s)
    missing = [s for s in order if not manifest.is_done(cfg, s)]
    if missing:
        url = manifest.manifest_url(cfg, missing[0])
        raise StageFailed(f"{missing[0]}: its job completed but {url} is missing")


def cancel(cfg: RunConfig) -> list[str]:
    """Cancel this run's jobs that are still queued or running; returns their ids."""
    jobs = latest_jobs(cfg)
    acct = accounting([j for j, _ in jobs.values()])
    active = [(s, j) for s, (j, _) in jobs.items() if acct.get(j) is None or acct[j].state in ACTIVE_STATES]
    if active:
        _slurm(["scancel", *[j for _, j in active]])
    for s, j in active:
        print(f"{s}: cancelled Slurm job {j}")
    if not active:
        print("nothing of this run is queued or running")
    return [j for _, j in active]


def slurm_status(cfg: RunConfig) -> None:
    """action=status: print each stage's job, state, progress and failure reason; action=cancel: cancel."""
    if cfg.action == "cancel":
        cancel(cfg)
    if not latest_jobs(cfg):
        print(f"run_dir: {cfg.run_dir}: no Slurm jobs submitted yet")
    print(format_status(cfg, stage_rows(cfg)))
    from tsvae_dist.evaluate import report_url

    print(f"report: {report_url(cfg)}")


# --- Inside a job --------------------------------------------------------------------------------------


def requeue_current_job(max_requeues: int) -> str | None:
    """Put the running Slurm job back in the queue; returns None when done, else why not.

    Must run while the job's tasks are still alive: a job whose tasks have all exited is complete,
    and its afterok dependents would start.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "not inside a Slurm job (SLURM_JOB_ID unset)"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= max_requeues:
        return f"cluster.max_requeues ({max_requeues}) reached after {restarts} requeues"
    # Slurm signals every process of the job, this one's children included: a second notice (USR1/USR2)
    # or a preemption (TERM) must not kill scontrol halfway, so it runs with them ignored.
    command = ["sh", "-c", 'trap "" USR1 USR2 TERM; exec scontrol requeue "$1"', "sh", job_id]
    why_not = ""
    for attempt in range(3):
        proc = _slurm(command, check=False)
        if proc.returncode == 0:
            return None
        why_not = f"`scontrol requeue {job_id}` failed ({proc.returncode}): {proc.stderr.strip()}"
        time.sleep(1 + attempt)
    return why_not
