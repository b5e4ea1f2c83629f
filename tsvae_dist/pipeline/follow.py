"""Following the run's Slurm jobs to the end; `action=status` and `action=cancel`.

`follow` polls Slurm accounting (sacct) until the report exists or a stage fails, printing state
changes and progress read from the stages' artifacts; a failure is one line naming the stage, its
job and the exception that ended it (a cause beats another rank's lost peer).
"""

from __future__ import annotations

import json
import os
import re
import time

from tsvae_dist import storage
from tsvae_dist.config import RunConfig
from tsvae_dist.data.shardformat import read_manifest
from tsvae_dist.layout import AGGREGATE, JOBS, STAGES, TRAINING_STAGES, checkpoint_samples
from tsvae_dist.pipeline.slurm import ACTIVE_STATES, JobRecord, SlurmError, accounting, command, latest_jobs
from tsvae_dist.storage import StorageError

# Lines of a task's error log that report a lost peer, not the cause: another rank's failure.
_PEER_LOSS = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "Broken pipe")
ACCOUNTING_PATIENCE_S = 300  # how long `follow` keeps retrying while Slurm accounting does not answer
_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")


class StageFailed(RuntimeError):
    """A stage's job ended without finishing the stage (failed, cancelled, timed out)."""


def _train_total(cfg: RunConfig, stage: str) -> int | None:
    """Samples a training stage consumes in total (epochs x whole global batches per epoch)."""
    # Stage 2 reads the latents (fewer than the images when bad samples were skipped), once encoded.
    latents = stage == "stage2" and storage.exists(storage.join(cfg.layout.latents, "manifest.json"))
    try:
        count = read_manifest(cfg.layout.latents if latents else cfg.dataset_root)["splits"]["train"]["count"]
    except Exception:  # status must work whatever state the dataset is in
        return None
    train = getattr(cfg, stage)
    return train.epochs * (count // train.batch_size) * train.batch_size


def _last_metrics(cfg: RunConfig, stage: str) -> dict | None:
    """The last line of a training stage's metrics.jsonl (None before the first)."""
    url = cfg.layout.metrics(stage)
    if not storage.exists(url):
        return None
    lines = storage.read_text(url).strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:  # a line being appended right now
        return json.loads(lines[-2]) if len(lines) > 1 else None


def stage_progress(cfg: RunConfig, stage: str, running: bool = False) -> tuple[str, str]:
    """(progress, last checkpoint) of a stage, read from its artifacts: samples, shards or the report.

    A training stage that is not running has done what its last checkpoint holds (a resume starts
    there); only a running one counts the metrics lines past it.
    """
    layout = cfg.layout
    done = layout.is_done(stage)
    if stage in TRAINING_STAGES:
        total = _train_total(cfg, stage)
        ckpts = sorted((samples, n) for n in storage.listdir(layout.checkpoints(stage))
                       if (samples := checkpoint_samples(n)) is not None)
        seen = ckpts[-1][0] if ckpts else 0
        last = _last_metrics(cfg, stage) if running else None
        if last is not None:
            seen = max(seen, int(last.get("samples", 0)))
        if done and total is not None:
            seen = total
        ckpt = storage.join(layout.checkpoints(stage), ckpts[-1][1]) if ckpts else "-"
        return f"{seen}/{total if total is not None else '?'} samples", ckpt
    if stage == "encode":
        try:
            splits = read_manifest(cfg.dataset_root)["splits"]
            total = sum(len(splits[s]["shards"]) for s in ("train", "test"))
        except Exception:
            total = None
        latents = layout.latents
        finished = sum(n.endswith(".done") for s in ("train", "test")
                       for n in storage.listdir(storage.join(latents, s)))
        return f"{finished}/{total if total is not None else '?'} shards", "-"
    return ("report written" if done else "-"), "-"


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def live_progress(cfg: RunConfig, stage: str) -> str:
    """A running stage's progress in one line: samples done/total, samples/s, ETA, loss and γ of training."""
    progress, _ = stage_progress(cfg, stage, running=True)
    if progress == "-":
        return "running"
    last = _last_metrics(cfg, stage) if stage in TRAINING_STAGES else None
    if last is None:
        return progress
    parts = [progress]
    rate, total = last.get("samples_per_s"), _train_total(cfg, stage)
    if rate:
        parts.append(f"{rate:.0f} samples/s")
        left = total - int(last.get("samples", 0)) if total is not None else 0
        if left > 0:
            parts.append(f"ETA {duration(left / rate)}")
    for key, name in (("loss", "loss"), ("gamma", "γ")):
        if key in last:
            parts.append(f"{name} {last[key]:.4g}")
    return ", ".join(parts)


# Our own error types, named by their class alone in a one-line message (their text names the culprit).
_OWN_ERRORS = re.compile(r"^tsvae_dist\.(?:errors|storage)\.(\w+Error): ")


def _exception_line(text: str) -> str | None:
    """The final exception line of the last Python traceback in a log, if any."""
    # torch.distributed prefixes the lines of an uncaught exception with "[rankN]: ".
    lines = [_RANK_PREFIX.sub("", ln, count=1) for ln in text.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    for ln in lines[starts[-1] + 1:]:
        if ln and not ln[0].isspace() and not ln.startswith("srun:"):
            return _OWN_ERRORS.sub(r"\1: ", ln.strip())
    return None


# srun's own report of a task that ended badly, e.g. "srun: error: node2: task 1: Killed" or
# "srun: error: node2: tasks 0,2: Exited with exit code 1".
_SRUN_TASK = re.compile(r"^srun: error: [^:]+: tasks? ([\d,-]+): (.+)$", re.M)


def _task_list(spec: str) -> list[int]:
    """srun's task list ("1", "0,2", "0-3") as numbers."""
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


def log_cause(folder: str, job_id: str) -> tuple[str, str] | None:
    """("rank N: <how it ended>", the task log that says so), from the job's task error logs.

    A task's log is `<job>_<task>_log.err` and its task is its global rank. A cause beats another
    rank's lost peer; of several causes, the one written first (the rank that raised first). When
    every traceback is a lost peer and a task's log has none, that task died without a Python error
    (killed by a signal, out of memory): that is the cause, with srun's word on how when it has one.
    """
    found, silent, srun = [], [], {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(f"{job_id}_") and name.endswith("_log.err"):
                path = os.path.join(folder, name)
                with open(path, errors="replace") as f:
                    text = f.read()
                rank = name.split("_")[1]
                for tasks, how in _SRUN_TASK.findall(text):  # srun writes into task 0's log
                    for task in _task_list(tasks):
                        srun.setdefault(str(task), how.strip())
                line = _exception_line(text)
                if line:
                    found.append((os.path.getmtime(path), f"rank {rank}: {line}", path))
                else:
                    silent.append((rank, path))
    causes = sorted(c for c in found if not any(p in c[1] for p in _PEER_LOSS))
    if causes:
        return causes[0][1], causes[0][2]
    # srun reports tasks in the order they ended: the first of them ended first; the rest may be its victims.
    order = list(srun)
    dead = sorted((t for t in silent if t[0] in srun), key=lambda t: order.index(t[0])) or silent
    if found and dead:
        rank, path = dead[0]
        how = f"ended by {srun[rank]}" if rank in srun else \
            "ended without a Python error (killed by a signal or out of memory?)"
        return f"rank {rank}: {how}; the other ranks lost their peer", path
    return (found[0][1], found[0][2]) if found else None


def log_error(folder: str, job_id: str) -> str | None:
    """The exception that ended a job, from its tasks' error logs (see `log_cause`)."""
    cause = log_cause(folder, job_id)
    return cause[0] if cause else None


def failure_reason(rec: JobRecord, folder: str, previous: tuple[str, JobRecord] | None) -> str:
    """Why a job ended without success, in one line."""
    error = log_error(folder, rec.job_id)
    # A dependent of a failed job is cancelled by Slurm; one whose predecessor was cancelled too (or was still
    # ending, COMPLETING, when both were cancelled) was cancelled by a person, e.g. action=cancel.
    if rec.state == "CANCELLED" and previous is not None and \
            previous[1].state not in ("COMPLETED", "CANCELLED", *ACTIVE_STATES):
        stage, prev = previous
        return f"dependency never satisfied: {stage} (job {prev.job_id}) ended {prev.state}"
    if rec.state == "CANCELLED":
        return "cancelled (scancel, action=cancel, or an administrator)"
    if rec.state == "TIMEOUT":
        return f"reached its time limit without requeueing itself{': ' + error if error else ''}"
    detail = error or (f"reason {rec.reason}" if rec.reason not in ("", "None") else "no error in the logs")
    return f"{rec.state} (exit {rec.exit_code}): {detail}"


def _is_done(cfg: RunConfig, stage: str) -> bool:
    try:
        return cfg.layout.is_done(stage)
    except StorageError:
        return False


def stage_rows(cfg: RunConfig, jobs: dict[str, tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """One row per stage: job, state, attempts, progress, last checkpoint and, on failure, the reason.

    `jobs`: stage -> (job id, log folder); default: the run's latest submissions (`slurm_jobs.json`).
    """
    jobs = latest_jobs(cfg.layout) if jobs is None else jobs
    acct = accounting([j for j, _ in jobs.values()])
    rows, previous = [], None
    for stage in STAGES:
        running = stage in jobs and getattr(acct.get(jobs[stage][0]), "state", "") == "RUNNING"
        try:
            progress, ckpt = stage_progress(cfg, stage, running)
        except StorageError:  # the store is down: the jobs' states and errors still tell the story
            progress, ckpt = "? (storage unreachable)", "-"
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
        elif _is_done(cfg, stage):
            row["state"] = "done"
        rows.append(row)
    return rows


def table(rows: list[dict[str, str]], cols: tuple[str, ...]) -> str:
    """Rows as aligned columns under a header; a row's "reason", if any, on a line of its own below it."""
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
        if r.get("reason"):
            lines.append(f"  {r['stage']}: {r['reason']}")
    return "\n".join(lines)


def format_status(cfg: RunConfig, rows: list[dict[str, str]]) -> str:
    return f"run_dir: {cfg.run_dir}\n" + table(rows, ("stage", "job", "state", "attempts", "progress", "checkpoint"))


def follow(cfg: RunConfig, jobs: dict[str, str], folder: str) -> None:
    """Poll accounting until every job completed (return) or one failed and its dependents ended (raise)."""
    order = [s for s in JOBS if s in jobs]  # the aggregate job of seeds > 1 is followed like a stage
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
                    try:
                        progress = live_progress(cfg, s)
                    except StorageError:  # the store is down: the job itself will say what it could not do
                        continue
                    if shown_progress.get(s) != progress:
                        shown_progress[s] = progress
                        print(f"{s}: {progress}", flush=True)
        states = [rec.state for rec in recs.values()]
        if all(st == "COMPLETED" for st in states):
            break
        bad = [s for s in order if recs[s].state not in ACTIVE_STATES and recs[s].state != "COMPLETED"]
        if bad:
            failed_at = failed_at or now
            settled = all(recs[s].state not in ACTIVE_STATES for s in order[order.index(bad[0]):])
            if settled or now - failed_at > 60:  # dependents should end at once (kill-on-invalid-dep)
                # The jobs this follower submitted: the run's job record may sit on a store that is down.
                print(format_status(cfg, stage_rows(cfg, {s: (j, folder) for s, j in jobs.items()})), flush=True)
                first = recs[bad[0]]
                previous = (order[order.index(bad[0]) - 1], recs[order[order.index(bad[0]) - 1]]) \
                    if order.index(bad[0]) > 0 else None
                raise StageFailed(f"{bad[0]}: Slurm job {first.job_id} {first.state}: "
                                  f"{failure_reason(first, folder, previous)}")
        time.sleep(cfg.cluster.poll_s)
    missing = [s for s in order if not cfg.layout.is_done(s)]
    if missing:
        url = cfg.layout.record(missing[0])
        raise StageFailed(f"{missing[0]}: its job completed but {url} is missing")


def cancel(cfg: RunConfig) -> list[str]:
    """Cancel this run's jobs that are still queued or running; returns their ids."""
    jobs = latest_jobs(cfg.layout)
    acct = accounting([j for j, _ in jobs.values()])
    active = [(s, j) for s, (j, _) in jobs.items() if acct.get(j) is None or acct[j].state in ACTIVE_STATES]
    if active:
        command(["scancel", *[j for _, j in active]])
    for s, j in active:
        print(f"{s}: cancelled Slurm job {j}")
    if not active:
        print("nothing of this run is queued or running")
    return [j for _, j in active]


def slurm_status(cfg: RunConfig) -> None:
    """action=status: print each stage's job, state, progress and failure reason; action=cancel: cancel."""
    if cfg.action == "cancel":
        cancel(cfg)
    if not latest_jobs(cfg.layout):
        print(f"run_dir: {cfg.run_dir}: no Slurm jobs submitted yet")
    print(format_status(cfg, stage_rows(cfg)))
    print(f"report: {cfg.layout.report}")


def aggregate_rows(cfg: RunConfig) -> list[dict[str, str]]:
    """The status row of the aggregate job of a seeds > 1 run (recorded in the top run directory)."""
    row = {"stage": AGGREGATE, "job": "-", "state": "not submitted", "attempts": "-",
           "progress": "report written" if _is_done(cfg, AGGREGATE) else "-", "reason": ""}
    jobs = latest_jobs(cfg.layout)
    if AGGREGATE in jobs:
        job_id, folder = jobs[AGGREGATE]
        rec = accounting([job_id]).get(job_id, JobRecord(job_id, "UNKNOWN", "", "not in Slurm's queue or "
                                                         "accounting", "", "", 0))
        row.update(job=job_id, state=rec.state, attempts=str(rec.attempts))
        if rec.state not in ACTIVE_STATES and rec.state != "COMPLETED":
            row["reason"] = failure_reason(rec, folder, None)
        elif rec.state == "PENDING" and rec.reason not in ("", "None"):
            row["reason"] = f"pending: {rec.reason}"
    elif _is_done(cfg, AGGREGATE):
        row["state"] = "done"
    return [row]
