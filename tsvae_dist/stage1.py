"""Stage 1: train the VAE with a learned or optimal γ_x (`stage1.gamma`) on the image shards.

Run alone with `python -m tsvae_dist.stage1 [overrides]` (or under torchrun/srun); the launcher
calls `run(cfg)` inside each job.
"""

from __future__ import annotations

from typing import Any

import torch

from tsvae_dist import dist, manifest, storage
from tsvae_dist.config import RunConfig, to_container
from tsvae_dist.datasets import ensure_dataset_once
from tsvae_dist.loader import StreamLoader
from tsvae_dist.models import build_stage1
from tsvae_dist.noise import keyed_normal
from tsvae_dist.trainer import TrainJob, train

STAGE = "stage1"
# Keys that may change between a checkpoint and its resume without changing the result.
NON_RESULT_KEYS = ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "progress_bar")
NON_RESULT_LOADER_KEYS = ("workers", "prefetch_factor", "start_method", "max_skipped_samples", "record_keys")


def resume_config(cfg: RunConfig, stage: str, loader: StreamLoader) -> dict[str, Any]:
    """The config keys a checkpoint of `stage` depends on (a resume under different values is refused)."""
    c = to_container(cfg)
    train_cfg = {k: v for k, v in c[stage].items() if k not in NON_RESULT_KEYS}
    train_cfg["loader"] = {k: v for k, v in train_cfg["loader"].items() if k not in NON_RESULT_LOADER_KEYS}
    train_cfg["loader"]["streams"] = loader.streams  # the effective value: 0 means "world x workers"
    return {"seed": c["seed"], "dataset": c["dataset"], "model": c["model"], stage: train_cfg}


def model_url(cfg: RunConfig, stage: str) -> str:
    return storage.join(manifest.stage_dir(cfg, stage), "model.pt")


def save_model(url: str, model: torch.nn.Module, cfg: RunConfig, stage: str, samples_seen: int) -> None:
    """The stage's artifact: final weights (plain BatchNorm keys) plus the config that made them."""
    body = {"model": model.state_dict(), "config": to_container(cfg), "stage": stage, "samples_seen": samples_seen}
    storage.write_bytes_atomic(url, storage.torch_save_bytes(body))


def run(cfg: RunConfig) -> str:
    """Train stage 1 (resuming if checkpoints exist); returns the URL of the trained model."""
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0)
    data_manifest = ensure_dataset_once(cfg, info)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every world size
    model = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution, gamma=cfg.stage1.gamma)
    loader = StreamLoader(cfg.dataset_root, "train", global_batch=cfg.stage1.batch_size, rank=info.rank,
                          world=info.world_size, cfg=cfg.stage1.loader, seed=cfg.seed)
    latent_dim = cfg.model.latent_dim

    def inputs(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, ...]:
        # z = μ + σ·ε with ε keyed by (seed, sample, epoch): independent of rank and batch layout.
        return batch["image"], keyed_normal(batch["key"], latent_dim, cfg.seed, STAGE, epoch)

    job = TrainJob(name=STAGE, model=model, loader=loader, inputs=inputs, directory=manifest.stage_dir(cfg, STAGE),
                   resume_config=resume_config(cfg, STAGE, loader))
    result = train(job, cfg.stage1, info)

    url = model_url(cfg, STAGE)
    if info.is_main:
        save_model(url, result.model, cfg, STAGE, result.samples_seen)
        manifest.write(
            cfg, STAGE,
            consumed={"dataset": {"url": storage.join(cfg.dataset_root, "manifest.json"),
                                  "sha256": manifest.sha256_of(storage.join(cfg.dataset_root, "manifest.json")),
                                  "name": data_manifest["name"]}},
            produced={"model": manifest.artifact(url)},
            extra={"metrics": result.last_metrics, "samples_seen": result.samples_seen},
        )
    dist.barrier()
    return url


if __name__ == "__main__":
    from tsvae_dist.cli import main

    main(run)
