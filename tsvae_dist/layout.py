"""The run directory: the one place that knows the pipeline's stages and where each keeps its files.

    <run_dir>/
      config.yaml, revision.txt          the frozen run (written by the launcher)
      slurm_jobs.json                    every Slurm submission of the run (job ids, log folder)
      logs/<stamp>/                      submitit's logs, a fresh folder per launch (local run_dir only)
      stage1/  checkpoints/ckpt-<samples>.pt, metrics.jsonl, tb/, model.pt, MANIFEST.json
      encode/  latents/manifest.json, latents/<split>/shard-*.tar(.done), MANIFEST.json
      stage2/  (as stage1)
      evaluate/ partial/, report.json, report.md, *.png, MANIFEST.json
      generate/<mode>/                   `python -m tsvae_dist.generate` output by default

With `seeds=N` (N > 1) the run directory holds N runs laid out as above, `seed-<k>/` with seed
`cfg.seed + k` (k = 0 .. N-1), and `aggregate/` (report.json, report.md, MANIFEST.json): their mean ± std.

A stage is done exactly when its MANIFEST.json (its *record*, see `records`) exists. Stages take the
paths they read and write from a `RunLayout`; none imports another stage to learn them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tsvae_dist import storage

STAGES = ("stage1", "encode", "stage2", "evaluate")  # the pipeline, in order: module tsvae_dist.stages.<name>
AGGREGATE = "aggregate"  # with seeds > 1: the job after every seed's pipeline (module tsvae_dist.stages.aggregate)
JOBS = (*STAGES, AGGREGATE)  # every job module the launcher can run
TRAINING_STAGES = ("stage1", "stage2")  # stages that train a model (progress in samples, checkpoints)
RECORD = "MANIFEST.json"  # a stage's completion record (a dataset's own index is `manifest.json`)
_CHECKPOINT = re.compile(r"^ckpt-(\d{12})\.pt$")


def stage_module(stage: str) -> str:
    """The module whose `run(cfg)` is the stage's job."""
    if stage not in JOBS:
        raise ValueError(f"unknown stage {stage!r}; the pipeline is {STAGES} (and {AGGREGATE} over seeds)")
    return f"tsvae_dist.stages.{stage}"


def checkpoint_name(samples_seen: int) -> str:
    """The file name of a training checkpoint taken after `samples_seen` samples (sorts by progress)."""
    return f"ckpt-{samples_seen:012d}.pt"


def checkpoint_samples(name: str) -> int | None:
    """The samples-seen count a checkpoint file name encodes, or None for any other name."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run, derived from its `run_dir` URL (local path or fsspec URL)."""

    run_dir: str

    # The run as a whole.
    @property
    def config(self) -> str:
        return storage.join(self.run_dir, "config.yaml")

    @property
    def revision(self) -> str:
        return storage.join(self.run_dir, "revision.txt")

    @property
    def slurm_jobs(self) -> str:
        return storage.join(self.run_dir, "slurm_jobs.json")

    @property
    def is_local(self) -> bool:
        return "://" not in self.run_dir

    @property
    def logs(self) -> str:
        """Where launches of a local run_dir keep their submitit log folders."""
        return storage.join(self.run_dir, "logs")

    # Every stage.
    def stage_dir(self, stage: str) -> str:
        return storage.join(self.run_dir, stage)

    def record(self, stage: str) -> str:
        """The stage's completion record: present exactly when the stage is done."""
        return storage.join(self.stage_dir(stage), RECORD)

    def is_done(self, stage: str) -> bool:
        return storage.exists(self.record(stage))

    # Training stages.
    def model(self, stage: str) -> str:
        """The trained weights a training stage commits (read by encode, evaluate, generate)."""
        return storage.join(self.stage_dir(stage), "model.pt")

    def checkpoints(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), "checkpoints")

    def metrics(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), "metrics.jsonl")

    def tensorboard(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), "tb")

    # Encode.
    @property
    def latents(self) -> str:
        """The latent shards' dataset root (stage 2 trains on it)."""
        return storage.join(self.stage_dir("encode"), "latents")

    # Evaluate.
    @property
    def report(self) -> str:
        return storage.join(self.stage_dir("evaluate"), "report.json")

    @property
    def report_markdown(self) -> str:
        return storage.join(self.stage_dir("evaluate"), "report.md")

    @property
    def partial_sums(self) -> str:
        """Where evaluation ranks keep their partial sums until the report is committed."""
        return storage.join(self.stage_dir("evaluate"), "partial")

    def partial_sums_of(self, rank: int, world: int) -> str:
        return storage.join(self.partial_sums, f"rank-{rank:05d}-of-{world:05d}.pt")

    # Several seeds (seeds > 1): one run per seed below this one, and their aggregate.
    def seed_dir(self, k: int) -> str:
        """The run directory of the k-th seed (seed = cfg.seed + k)."""
        return storage.join(self.run_dir, f"seed-{k}")

    @property
    def aggregate_report(self) -> str:
        return storage.join(self.stage_dir(AGGREGATE), "report.json")

    @property
    def aggregate_report_markdown(self) -> str:
        return storage.join(self.stage_dir(AGGREGATE), "report.md")

    # Generate.
    def samples(self, mode: str) -> str:
        return storage.join(self.run_dir, "generate", mode)
