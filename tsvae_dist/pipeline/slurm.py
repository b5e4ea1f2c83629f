"""Slurm's command line, thinly wrapped: running a command, reading job states, the run's job record,
and (inside a job) requeueing it. What compute nodes load: nothing here imports submitit or torch.

Inside a job, `requeue_current_job` is how a stage stopped by USR1/USR2 (a time limit ahead, or a
preemption notice) puts itself back in the queue; a partition preemption (TERM) is requeued by
Slurm itself. A requeued job runs the same pickled task again, which resumes from its checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tsvae_dist import storage
from tsvae_dist.errors import ConfigError
from tsvae_dist.layout import RunLayout

# Job states from which a job may still run (sacct shows a requeued job as PENDING again).
ACTIVE_STATES = frozenset({
    "SUBMITTED",  # ours: submitted, not yet in accounting
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
    "STAGE_OUT", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
})  # PREEMPTED is not: a requeued job is back in the queue; one preempted for good is not


class SlurmError(RuntimeError):
    """A Slurm command failed (the message holds the command and its error output)."""


@dataclass
class JobRecord:
    job_id: str  # Slurm job id
    state: str  # accounting state of the latest attempt (first word: "CANCELLED by 0" -> CANCELLED)
    exit_code: str  # "code:signal" of the latest attempt
    reason: str  # Slurm's reason field (why pending, or why it ended)
    start: str  # start of the latest attempt (ISO time or "Unknown")
    end: str  # end of the latest attempt
    attempts: int  # 1 + the number of requeues seen by accounting


def command(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError(f"cluster.name: slurm, but `{args[0]}` is not on PATH (no Slurm client here)") \
            from None
    if check and proc.returncode != 0:
        raise SlurmError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def accounting(job_ids: Sequence[str]) -> dict[str, JobRecord]:
    """Each job's latest attempt: the queue's view while Slurm holds the job, else accounting's.

    Jobs neither queued nor (yet) in accounting are absent.
    """
    if not job_ids:
        return {}
    fields = "JobIDRaw,State,ExitCode,Reason,Start,End"
    proc = command(["sacct", "--allocations", "--duplicates", "--noheader", "--parsable2",
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
    queue = command(["squeue", "--noheader", f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r"], check=False)
    for line in queue.stdout.splitlines():
        job_id, state, reason = line.strip().split("|")
        if job_id in out:
            out[job_id].state, out[job_id].reason = state, reason
        else:
            out[job_id] = JobRecord(job_id, state, "", reason, "", "", 1)
    return out


def read_jobs_record(layout: RunLayout) -> dict:
    """Every Slurm submission of the run (`<run_dir>/slurm_jobs.json`): time, log folder, stage -> job id."""
    url = layout.slurm_jobs
    return json.loads(storage.read_text(url)) if storage.exists(url) else {"submissions": []}


def record_submission(layout: RunLayout, folder: str, jobs: dict[str, str]) -> None:
    record = read_jobs_record(layout)
    record["submissions"].append({
        "submitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "log_folder": folder, "jobs": jobs,
    })
    storage.write_text_atomic(layout.slurm_jobs, json.dumps(record, indent=2) + "\n")


def latest_jobs(layout: RunLayout) -> dict[str, tuple[str, str]]:
    """stage -> (job id, log folder) of the stage's most recent submission in this run."""
    out: dict[str, tuple[str, str]] = {}
    for submission in read_jobs_record(layout)["submissions"]:
        for stage, job_id in submission["jobs"].items():
            out[stage] = (job_id, submission["log_folder"])
    return out


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
    argv = ["sh", "-c", 'trap "" USR1 USR2 TERM; exec scontrol requeue "$1"', "sh", job_id]
    why_not = ""
    for attempt in range(3):
        proc = command(argv, check=False)
        if proc.returncode == 0:
            return None
        why_not = f"`scontrol requeue {job_id}` failed ({proc.returncode}): {proc.stderr.strip()}"
        time.sleep(1 + attempt)
    return why_not
