"""The pipeline launcher: config in, one submitit job per stage out.

Stages run in order stage1 → encode → stage2 → evaluate (`layout.STAGES`); a stage whose record
exists is skipped, so re-running the same command after a failure runs only what is left. Locally
the stages run one after the other through submitit's local executor; on Slurm they are submitted
at once as a chain of dependent jobs (`submit`) and followed to the end (`follow`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import yaml

from tsvae_dist import records, storage
from tsvae_dist.config import RunConfig, stage_cluster, to_container
from tsvae_dist.data.datasets import ensure_dataset
from tsvae_dist.layout import STAGES
from tsvae_dist.pipeline import follow, submit
from tsvae_dist.pipeline.task import StageTask

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
    lines.append(f"report: {cfg.layout.report}")
    return "\n".join(lines)


def log_folder(cfg: RunConfig) -> str:
    """A fresh submitit folder per pipeline launch (reused folders can return stale results)."""
    layout = cfg.layout
    base = layout.logs if layout.is_local else os.path.join("logs", "submitit")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return os.path.abspath(os.path.join(base, stamp))


def freeze_run(cfg: RunConfig) -> None:
    """Write the resolved config and the code revision into the run directory."""
    storage.makedirs(cfg.run_dir)
    storage.write_text_atomic(cfg.layout.config, yaml.safe_dump(to_container(cfg), sort_keys=False))
    storage.write_text_atomic(cfg.layout.revision, records.code_revision() + "\n")


def local_executor(cfg: RunConfig, stage: str, folder: str):
    import submitit

    c = stage_cluster(cfg.cluster, stage)
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(tasks_per_node=c.tasks_per_node, nodes=1, timeout_min=c.time_min,
                               gpus_per_node=c.gpus_per_node, signal_delay_s=c.signal_delay_s)
    return executor


def run_local(cfg: RunConfig, stages: list[PlannedStage]) -> None:
    """Run the remaining stages one after the other with submitit's local executor."""
    folder = log_folder(cfg)
    config = to_container(cfg)
    for s in stages:
        if s.done:
            print(f"{s.name}: done, skipped")
            continue
        job = local_executor(cfg, s.name, folder).submit(StageTask(s.name, config))
        print(f"{s.name}: running as local job {job.job_id} ({s.tasks_per_node} processes), logs in {folder}",
              flush=True)
        job.results()  # raises with the failing task's traceback
        print(f"{s.name}: finished", flush=True)


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
    try:
        follow.follow(cfg, jobs, folder)
    except KeyboardInterrupt:
        print("\nstopped following; the jobs go on: the same command with action=status shows them, "
              "action=cancel cancels them", flush=True)
        raise


def launch(cfg: RunConfig) -> str:
    """Run or submit the pipeline for a validated config; returns the report URL."""
    stages = plan(cfg)
    if cfg.action == "dry_run":
        print(describe(cfg, stages))
        return cfg.layout.report
    freeze_run(cfg)
    ensure_dataset(cfg.dataset, cfg.dataset_root)  # builds the synthetic set once here, not in every job
    if cfg.cluster.name == "local":
        run_local(cfg, stages)
    else:
        run_slurm(cfg, stages)
    return cfg.layout.report


def status(cfg: RunConfig) -> None:
    """Print each stage's state (action=status) or cancel queued jobs (action=cancel)."""
    if cfg.cluster.name == "slurm":
        follow.slurm_status(cfg)
        return
    if cfg.action == "cancel":
        print("cluster=local: stages run in the foreground; nothing is queued to cancel")
    print(describe(cfg, plan(cfg)))
