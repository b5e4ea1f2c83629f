"""The pipeline launcher: config in, one submitit job per stage out.

Stages run in order stage1 → encode → stage2 → evaluate; a stage whose manifest exists is
skipped, so re-running the same command after a failure runs only what is left.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import yaml

from tsvae_dist import manifest, storage
from tsvae_dist.config import STAGES, RunConfig, stage_cluster, to_container
from tsvae_dist.datasets import ensure_dataset
from tsvae_dist.evaluate import report_url
from tsvae_dist.jobs import StageTask

log = logging.getLogger(__name__)


@dataclass
class PlannedStage:
    name: str  # stage name
    done: bool  # its manifest exists: it will be skipped
    nodes: int  # nodes of its job
    tasks_per_node: int  # processes per node


def plan(cfg: RunConfig) -> list[PlannedStage]:
    out = []
    for stage in STAGES:
        c = stage_cluster(cfg.cluster, stage)
        out.append(PlannedStage(stage, manifest.is_done(cfg, stage), c.nodes, c.tasks_per_node))
    return out


def describe(cfg: RunConfig, stages: list[PlannedStage]) -> str:
    lines = [f"run_dir: {cfg.run_dir}", f"cluster: {cfg.cluster.name}", f"dataset: {cfg.dataset_root}"]
    for s in stages:
        what = "done, skipped" if s.done else f"{s.nodes} node(s) x {s.tasks_per_node} task(s)"
        lines.append(f"  {s.name:9s} {what}")
    lines.append(f"report: {report_url(cfg)}")
    return "\n".join(lines)


def log_folder(cfg: RunConfig) -> str:
    """A fresh submitit folder per pipeline launch (reused folders can return stale results)."""
    base = os.path.join(cfg.run_dir, "logs") if "://" not in cfg.run_dir else os.path.join("logs", "submitit")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return os.path.abspath(os.path.join(base, stamp))


def freeze_run(cfg: RunConfig) -> None:
    """Write the resolved config and the code revision into the run directory."""
    storage.makedirs(cfg.run_dir)
    storage.write_text_atomic(storage.join(cfg.run_dir, "config.yaml"),
                              yaml.safe_dump(to_container(cfg), sort_keys=False))
    storage.write_text_atomic(storage.join(cfg.run_dir, "revision.txt"), manifest.code_revision() + "\n")


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


def launch(cfg: RunConfig) -> str:
    """Run or submit the pipeline for a validated config; returns the report URL."""
    stages = plan(cfg)
    if cfg.action == "dry_run":
        print(describe(cfg, stages))
        return report_url(cfg)
    freeze_run(cfg)
    ensure_dataset(cfg)  # builds the synthetic set once here, not in every job
    if cfg.cluster.name == "local":
        run_local(cfg, stages)
    else:
        from tsvae_dist.slurm import run_slurm

        run_slurm(cfg, stages)
    return report_url(cfg)


def status(cfg: RunConfig) -> None:
    """Print each stage's state (action=status) or cancel queued jobs (action=cancel)."""
    if cfg.cluster.name == "slurm":
        from tsvae_dist.slurm import slurm_status

        slurm_status(cfg)
        return
    if cfg.action == "cancel":
        print("cluster=local: stages run in the foreground; nothing is queued to cancel")
    print(describe(cfg, plan(cfg)))
