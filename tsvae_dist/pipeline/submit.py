"""Submitting the pipeline's remaining stages to Slurm as a chain of dependent jobs.

Every stage's request is checked against the live cluster (partition, nodes, CPUs and GPUs per node)
before anything is submitted; then the stages are submitted at once through submitit, each `afterok`
on the one before and with `--kill-on-invalid-dep=yes`, so a failed stage cancels its dependents
instead of leaving them pending forever; within a job, srun's `--kill-on-bad-exit=1` ends every task
as soon as one fails. Every cluster fact comes from `cluster.*` (conf/cluster/*.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tsvae_dist.config import ClusterConfig, RunConfig, stage_cluster, to_container
from tsvae_dist.errors import ConfigError
from tsvae_dist.pipeline.slurm import ACTIVE_STATES, accounting, command, latest_jobs, record_submission
from tsvae_dist.pipeline.task import StageTask


@dataclass
class Partition:
    name: str  # partition name
    default: bool  # the cluster's default partition
    nodes: int  # nodes in the partition
    cpus_per_node: int  # the most CPUs a node of the partition has
    gpus_per_node: int  # the most GPUs (gres gpu) a node of the partition has


# --- Checks against the live cluster, before anything is submitted --------------------------------------


def partitions() -> dict[str, Partition]:
    """The cluster's partitions as sinfo reports them (one line per partition and node state)."""
    out = command(["sinfo", "--noheader", "--format=%P|%D|%c|%G"]).stdout
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
        # A task that exits non-zero (a rank that raised, or one killed) ends the step's other tasks at
        # once, instead of leaving them in a collective with a dead peer until its timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
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


def refuse_duplicates(cfg: RunConfig, stages: Sequence[str]) -> None:
    """A stage of this run that is still queued or running must not be submitted a second time."""
    jobs = {s: j for s, (j, _) in latest_jobs(cfg.layout).items() if s in stages}
    if not jobs:
        return
    acct = accounting(list(jobs.values()))
    for stage, job_id in jobs.items():
        rec = acct.get(job_id)
        if rec is not None and rec.state in ACTIVE_STATES:
            raise ConfigError(f"run_dir: {stage} of {cfg.run_dir} is still {rec.state} as Slurm job "
                              f"{job_id}; follow it with action=status, or stop it with action=cancel "
                              "before submitting again")


def submit_stages(cfg: RunConfig, stages: Sequence[str], folder: str,
                  dependency: str | None = None) -> dict[str, str]:
    """Submit `stages` (in pipeline order) as a chain of afterok jobs; returns stage -> job id.

    `dependency`: the first job's (the aggregate of seeds > 1 waits on every seed's chain)."""
    config = to_container(cfg)
    jobs: dict[str, str] = {}
    previous = None
    first = dependency
    try:
        for stage in stages:
            dependency = f"afterok:{previous}" if previous else first
            job = stage_executor(cfg, stage, folder, dependency).submit(StageTask(stage, config))
            jobs[stage] = previous = str(job.job_id)
            c = stage_cluster(cfg.cluster, stage)
            where = f"partition {c.partition}" if c.partition else "default partition"
            after = f", {dependency}" if dependency else ""
            print(f"{stage}: submitted as Slurm job {job.job_id} ({c.nodes} node(s) x {c.tasks_per_node} "
                  f"task(s), {where}{after})", flush=True)
    except Exception:
        if jobs:  # all or nothing: a half-submitted chain would run stages nobody follows
            command(["scancel", *jobs.values()], check=False)
            print(f"submission failed: cancelled jobs {', '.join(jobs.values())}", flush=True)
        raise
    return jobs


def submit(cfg: RunConfig, todo: Sequence[str], folder: str) -> dict[str, str]:
    """Check the stages `todo` against the live cluster, submit them and record the submission in the run."""
    check_cluster(cfg, todo, partitions())
    refuse_duplicates(cfg, todo)
    jobs = submit_stages(cfg, todo, folder)
    record_submission(cfg.layout, folder, jobs)
    return jobs
