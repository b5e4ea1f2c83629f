"""The pipeline launcher: config in, one submitit job per stage out.

Stages run in order stage1 → encode → stage2 → evaluate (`layout.STAGES`); a stage whose record
exists is skipped, so re-running the same command after a failure runs only what is left. Locally
the stages run one after the other through submitit's local executor; on Slurm they are submitted
at once as a chain of dependent jobs (`submit`) and followed to the end (`follow`).

With `seeds=N` > 1 the pipeline runs N times, `<run_dir>/seed-<k>/` with seed `seed + k`
(`RunConfig.for_seed`), each skipping what it has done, then the aggregate job (`layout.AGGREGATE`)
writes mean ± std over the seeds' reports into `<run_dir>/aggregate/`, skipped when its record exists.
Locally the seeds run one after another; on Slurm each seed is its own chain of dependent jobs, all
submitted at once, and the aggregate job waits (afterok) on every chain's last job.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import yaml

from tsvae_dist import records, storage
from tsvae_dist.config import RunConfig, stage_cluster, to_container
from tsvae_dist.data.datasets import ensure_dataset
from tsvae_dist.data.shardformat import manifest_url
from tsvae_dist.errors import ConfigError
from tsvae_dist.fid.weights import check_fid_config
from tsvae_dist.layout import AGGREGATE, STAGES, TRAINING_STAGES
from tsvae_dist.pipeline import follow, submit
from tsvae_dist.pipeline.slurm import command, record_submission
from tsvae_dist.pipeline.task import StageTask
from tsvae_dist.runtime import RENDEZVOUS_FILE_VAR

log = logging.getLogger(__name__)


@dataclass
class PlannedStage:
    name: str  # stage name
    done: bool  # its record exists: it will be skipped
    nodes: int  # nodes of its job
    tasks_per_node: int  # processes per node


def plan(cfg: RunConfig) -> list[PlannedStage]:
    out = []
    for stage in STAGES:
        c = stage_cluster(cfg.cluster, stage)
        out.append(PlannedStage(stage, cfg.layout.is_done(stage), c.nodes, c.tasks_per_node))
    return out


def describe(cfg: RunConfig, stages: list[PlannedStage]) -> str:
    lines = [f"run_dir: {cfg.run_dir}", f"cluster: {cfg.cluster.name}", f"dataset: {cfg.dataset_root}"]
    for s in stages:
        what = "done, skipped" if s.done else f"{s.nodes} node(s) x {s.tasks_per_node} task(s)"
        lines.append(f"  {s.name:9s} {what}")
    return "\n".join(lines)


def describe_seeds(cfg: RunConfig) -> str:
    """What a seeds > 1 run would do: each seed's stages, then the aggregate job."""
    lines = [f"run_dir: {cfg.run_dir} ({cfg.seeds} seeds)", f"cluster: {cfg.cluster.name}",
             f"dataset: {cfg.dataset_root}"]
    for k in range(cfg.seeds):
        run = cfg.for_seed(k)
        lines.append(f"seed-{k} (seed {run.seed}): {run.run_dir}")
        lines += ["  " + ln for ln in describe(run, plan(run)).splitlines()[3:]]
    done = cfg.layout.is_done(AGGREGATE)
    lines.append(f"  {AGGREGATE:9s} " + ("done, skipped" if done else f"1 task, after the {cfg.seeds} seeds' evaluate"))
    return "\n".join(lines)


def log_folder(cfg: RunConfig) -> str:
    """A fresh submitit folder per pipeline launch (reused folders can return stale results).

    submitit writes its folder with plain file IO and the jobs read their pickled task from it, so it
    is a local (on a cluster: shared) path: `<run_dir>/logs/` for a local run_dir; for a run_dir on an
    object store, `<eval.cache_dir>/logs/<run>/` (`~/.cache/tsvae/logs/<run>/` if the cache is remote
    too), never the current directory.
    """
    layout = cfg.layout
    if layout.is_local:
        base = layout.logs
    else:
        cache = cfg.eval.cache_dir if "://" not in cfg.eval.cache_dir else os.path.expanduser("~/.cache/tsvae")
        run = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.run_dir.split("://", 1)[1]).strip("_")
        base = os.path.join(cache, "logs", run)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return os.path.abspath(os.path.join(base, stamp))


def preflight(cfg: RunConfig) -> None:
    """What can be checked before anything is written or submitted: the FID weights (a URL is downloaded
    into eval.cache_dir and hash-checked) and that run_dir can be written."""
    check_fid_config(cfg)
    reason = storage.unwritable_reason(cfg.run_dir)
    if reason is not None:
        raise ConfigError(f"run_dir: cannot create or write '{cfg.run_dir}': {reason}")


def check_dataset(cfg: RunConfig, manifest: dict) -> None:
    """The training stages' loader settings against the dataset's shards (stage 2 reads one latent
    shard per image shard), before any job: the check each job's loader would make."""
    entry = manifest["splits"]["train"]
    for stage in TRAINING_STAGES:
        train = getattr(cfg, stage)
        root = cfg.dataset_root if stage == "stage1" else cfg.layout.latents
        try:
            train.loader.validate_split(entry, "train", root, train.batch_size, cfg.world_size(stage))
        except ConfigError as e:
            raise ConfigError(f"{stage}.loader.{e}") from None


def freeze_run(cfg: RunConfig) -> None:
    """Write the resolved config and the code revision into the run directory."""
    storage.makedirs(cfg.run_dir)
    storage.write_text_atomic(cfg.layout.config, yaml.safe_dump(to_container(cfg), sort_keys=False))
    storage.write_text_atomic(cfg.layout.revision, records.code_revision() + "\n")


@contextlib.contextmanager
def _environment(**values: str):
    """Variables set in this process for the duration (submitit's local controller copies the
    environment it is started in)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def submit_local(cfg: RunConfig, stage: str, folder: str, task: StageTask):
    """Start `task` as a local submitit job whose ranks meet through a fresh file in `folder` (no port:
    submitit draws a local job's port from its pid, and another process may hold it)."""
    rendezvous = os.path.join(folder, f"rendezvous-{uuid.uuid4().hex}")
    with _environment(**{RENDEZVOUS_FILE_VAR: rendezvous}):
        return local_executor(cfg, stage, folder).submit(task)


def local_executor(cfg: RunConfig, stage: str, folder: str):
    import submitit

    c = stage_cluster(cfg.cluster, stage)
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=c.tasks_per_node, nodes=1, timeout_min=c.time_min,
                               gpus_per_node=c.gpus_per_node, signal_delay_s=c.signal_delay_s)
    return executor


# After a rank has failed, how long its peers get to fail by themselves (and write their own error)
# before the launcher ends them: long enough for a lost-peer error, far shorter than any timeout.
FAILED_RANK_GRACE_S = 3.0


# What submitit's task wrapper logs (to the task's stdout log) when the submitted function raised.
_TASK_RAISED = "Submitted job triggered an exception"


def _failed_task(folder: str, job_id: str, tasks: int) -> int | None:
    """The lowest task of a running local job that has raised, from its log (its result file is a
    pickle, which the launcher does not load)."""
    for task in range(tasks):
        try:
            with open(os.path.join(folder, f"{job_id}_{task}_log.out"), errors="replace") as f:
                if _TASK_RAISED in f.read():
                    return task
        except OSError:
            continue  # not started yet
    return None


def _kill_tasks(job) -> None:
    """SIGKILL the task processes of a local job (its controller's children, found through Linux /proc).

    Not submitit's cancel: that SIGINTs the controller, which prints a KeyboardInterrupt traceback into
    the launcher's output, and does nothing at all when the controller inherited an ignored SIGINT (a
    launcher started as a background job of a non-interactive shell). With its tasks gone, the
    controller ends by itself. A rank waiting in a collective cannot run a signal handler anyway."""
    process = getattr(job, "_process", None)
    if process is None or process.poll() is not None:
        return
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if ppid == process.pid:
            with contextlib.suppress(OSError):
                os.kill(int(stat.split("/")[2]), signal.SIGKILL)


def _watch_local(cfg: RunConfig, stage: str, job, folder: str, tasks: int) -> None:
    """Until the local job ends: its progress, from the stage's artifacts (as the Slurm follower reads
    it), rewritten in place on a terminal, a line every 10 s when not changed otherwise.

    Once a rank has raised, its peers may wait in a collective for it (a lingering process, NCCL): after
    FAILED_RANK_GRACE_S its remaining processes are killed (`_kill_tasks`, again each poll until the
    job has ended)."""
    tty, shown, last_print = sys.stdout.isatty(), "", 0.0
    failed_at: float | None = None
    while not job.done():
        time.sleep(0.5 if tty else 1.0)
        if failed_at is None and _failed_task(folder, job.job_id, tasks) is not None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
            _kill_tasks(job)
        try:
            line = f"{stage}: {follow.live_progress(cfg, stage)}"
        except Exception:  # progress is a courtesy: never let reading it end the run
            continue
        now = time.monotonic()
        if tty:
            print(f"\r{line}\x1b[K", end="", flush=True)
        elif line != shown and now - last_print >= 10.0:
            print(line, flush=True)
            shown, last_print = line, now
    if tty:
        print("\r\x1b[K", end="", flush=True)


def run_local(cfg: RunConfig, stages: list[PlannedStage]) -> None:
    """Run the remaining stages one after the other with submitit's local executor, showing progress."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    folder = log_folder(cfg)
    config = to_container(cfg)
    rows = []
    for s in stages:
        if s.done:
            print(f"{s.name}: done, skipped")
            rows.append({"stage": s.name, "state": "done", "time": "-", "progress": "skipped"})
            continue
        job = submit_local(cfg, s.name, folder, StageTask(s.name, config))
        print(f"{s.name}: running as local job {job.job_id} ({s.tasks_per_node} processes), logs in {folder}",
              flush=True)
        started = time.monotonic()
        _watch_local(cfg, s.name, job, folder, s.tasks_per_node)
        try:
            job.results()
        except (FailedJobError, UncompletedJobError):
            cause = follow.log_cause(folder, job.job_id)
            what, where = cause if cause else ("its processes ended without a result or an error", folder)
            raise follow.StageFailed(f"{s.name}: {what} (log: {where})") from None
        took = follow.duration(time.monotonic() - started)
        progress = follow.live_progress(cfg, s.name)
        print(f"{s.name}: finished in {took}: {progress}", flush=True)
        rows.append({"stage": s.name, "state": "finished", "time": took, "progress": progress})
    print(follow.table(rows, ("stage", "state", "time", "progress")), flush=True)


def fid_note(cfg: RunConfig) -> str | None:
    """A line saying FID was not computed, and why (from the report), or None when it was."""
    if not storage.exists(cfg.layout.report):
        return None
    status = json.loads(storage.read_text(cfg.layout.report)).get("fid", {}).get("status", "computed")
    return None if status == "computed" else f"fid: {status}"


@contextlib.contextmanager
def _interruptible_follow():
    """Ctrl-C while following Slurm jobs stops the following, not the jobs: say so, then re-raise."""
    try:
        yield
    except KeyboardInterrupt:
        print("\nstopped following; the jobs go on: the same command with action=status shows them, "
              "action=cancel cancels them", flush=True)
        raise


def run_slurm(cfg: RunConfig, stages: list[PlannedStage]) -> None:
    """Submit the stages that are not done as dependent jobs; with `cluster.wait`, follow them to the end."""
    for s in stages:
        if s.done:
            print(f"{s.name}: done, skipped")
    todo = [s.name for s in stages if not s.done]
    if not todo:
        return
    folder = log_folder(cfg)  # fresh per submission: a reused folder can return a stale result
    jobs = submit.submit(cfg, todo, folder)
    print(f"logs: {folder}")
    print(f"artifacts: {cfg.run_dir}", flush=True)
    if not cfg.cluster.wait:
        print("not waiting (cluster.wait=false): run the same command with action=status to follow the jobs")
        return
    with _interruptible_follow():
        follow.follow(cfg, jobs, folder)


def launch_seeds(cfg: RunConfig) -> str:
    """seeds > 1: every seed's pipeline (one after another locally), then the aggregate; its report URL."""
    if cfg.action == "dry_run":
        if cfg.dataset.name != "synthetic" or storage.exists(manifest_url(cfg.dataset_root)):
            check_dataset(cfg.for_seed(0), ensure_dataset(cfg.dataset, cfg.dataset_root))
        print(describe_seeds(cfg))
        return cfg.layout.aggregate_report
    manifest = ensure_dataset(cfg.dataset, cfg.dataset_root)
    runs = [cfg.for_seed(k) for k in range(cfg.seeds)]
    for run in runs:
        check_dataset(run, manifest)
    freeze_run(cfg)
    if cfg.cluster.name != "local":
        run_slurm_seeds(cfg, runs)
        return cfg.layout.aggregate_report
    for k, run in enumerate(runs):
        stages = plan(run)
        if all(s.done for s in stages):
            print(f"seed-{k} (seed {run.seed}): done, skipped", flush=True)
            continue
        print(f"seed-{k} (seed {run.seed}): {run.run_dir}", flush=True)
        freeze_run(run)
        run_local(run, stages)
    run_local(cfg, [PlannedStage(AGGREGATE, cfg.layout.is_done(AGGREGATE), 1, 1)])
    notes = {note for run in runs if (note := fid_note(run))}
    for note in sorted(notes):
        print(note)
    return cfg.layout.aggregate_report


def run_slurm_seeds(cfg: RunConfig, runs: list[RunConfig]) -> None:
    """seeds > 1 on Slurm: every seed's remaining stages as its own afterok chain, all submitted at once
    (the chains run side by side), then the aggregate job afterok on each chain's last job.

    Done seeds and a done aggregate are skipped, so a re-run submits only what is left; every chain is
    recorded in its seed's `slurm_jobs.json`, the aggregate in the top run directory's.
    """
    todo: list[tuple[RunConfig, list[str]]] = []
    for k, run in enumerate(runs):
        left = [s.name for s in plan(run) if not s.done]
        print(f"seed-{k} (seed {run.seed}): " + (f"{run.run_dir}: {', '.join(left)}" if left else "done, skipped"),
              flush=True)
        if left:
            todo.append((run, left))
    aggregate_done = cfg.layout.is_done(AGGREGATE)
    if aggregate_done:
        print(f"{AGGREGATE}: done, skipped")
    if not todo and aggregate_done:
        return
    # Every check before any submission: a refusal for seed 2 must not leave seed 0's chain queued.
    parts = submit.partitions()
    for run, left in todo:
        submit.check_cluster(run, left, parts)
        submit.refuse_duplicates(run, left)
    if not aggregate_done:
        submit.check_cluster(cfg, [AGGREGATE], parts)
        submit.refuse_duplicates(cfg, [AGGREGATE])
    folder = log_folder(cfg)  # one fresh folder for the whole submission: every seed's logs together
    chains: list[tuple[RunConfig, dict[str, str]]] = []
    try:
        for run, left in todo:
            freeze_run(run)
            jobs = submit.submit_stages(run, left, folder)
            record_submission(run.layout, folder, jobs)
            chains.append((run, jobs))
        aggregate: dict[str, str] = {}
        if not aggregate_done:
            last = [jobs[left[-1]] for (_, jobs), (_, left) in zip(chains, todo, strict=True)]
            aggregate = submit.submit_stages(cfg, [AGGREGATE], folder,
                                             dependency=f"afterok:{':'.join(last)}" if last else None)
            record_submission(cfg.layout, folder, aggregate)
    except Exception:
        submitted = [j for _, jobs in chains for j in jobs.values()]
        if submitted:  # all or nothing, as for one chain: half the seeds queued would be followed by nobody
            command(["scancel", *submitted], check=False)
            print(f"submission failed: cancelled jobs {', '.join(submitted)}", flush=True)
        raise
    print(f"logs: {folder}")
    print(f"artifacts: {cfg.run_dir}", flush=True)
    if not cfg.cluster.wait:
        print("not waiting (cluster.wait=false): run the same command with action=status to follow the jobs")
        return
    with _interruptible_follow():
        for run, jobs in chains:  # they run side by side: following one after another misses nothing
            print(f"following {run.run_dir}", flush=True)
            follow.follow(run, jobs, folder)
        if aggregate:
            follow.follow(cfg, aggregate, folder)


def slurm_status_seeds(cfg: RunConfig) -> None:
    """action=status/cancel over every seed's jobs and the aggregate job."""
    for k in range(cfg.seeds):
        print(f"seed-{k}:")
        follow.slurm_status(cfg.for_seed(k))
    if cfg.action == "cancel":
        follow.cancel(cfg)
    rows = follow.aggregate_rows(cfg)
    print(follow.table(rows, ("stage", "job", "state", "attempts", "progress")))
    print(f"report: {cfg.layout.aggregate_report}")


def launch(cfg: RunConfig) -> str:
    """Check, then run or submit the pipeline for a validated config; returns the report URL."""
    preflight(cfg)
    if cfg.seeds > 1:
        return launch_seeds(cfg)
    stages = plan(cfg)
    if cfg.action == "dry_run":
        if cfg.dataset.name != "synthetic" or storage.exists(manifest_url(cfg.dataset_root)):
            check_dataset(cfg, ensure_dataset(cfg.dataset, cfg.dataset_root))  # reads; builds nothing
        print(describe(cfg, stages))
        return cfg.layout.report
    manifest = ensure_dataset(cfg.dataset, cfg.dataset_root)  # builds the synthetic set once here, not per job
    check_dataset(cfg, manifest)
    freeze_run(cfg)
    if cfg.cluster.name == "local":
        run_local(cfg, stages)
    else:
        run_slurm(cfg, stages)
    note = fid_note(cfg) if cfg.cluster.name == "local" or cfg.cluster.wait else None
    if note:
        print(note)
    return cfg.layout.report


def status(cfg: RunConfig) -> None:
    """Print each stage's state (action=status) or cancel queued jobs (action=cancel)."""
    if cfg.cluster.name == "slurm":
        if cfg.seeds > 1:
            slurm_status_seeds(cfg)
        else:
            follow.slurm_status(cfg)
        return
    if cfg.action == "cancel":
        print("cluster=local: stages run in the foreground; nothing is queued to cancel")
    if cfg.seeds > 1:
        print(describe_seeds(cfg))
        print(f"report: {cfg.layout.aggregate_report}")
        return
    print(describe(cfg, plan(cfg)))
    print(f"report: {cfg.layout.report}")
