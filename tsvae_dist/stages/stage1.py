"""Stage 1: train the VAE with a learned or optimal γ_x (`stage1.gamma`) on the image shards.

Run alone with `python -m tsvae_dist.stage1 [overrides]` (or under torchrun/srun); the launcher
calls `run(cfg)` inside each job.
"""

from __future__ import annotations

from typing import Any

import torch

from tsvae_dist import records
from tsvae_dist.config import RunConfig
from tsvae_dist.data.loader import StreamLoader
from tsvae_dist.data.shardformat import manifest_url
from tsvae_dist.models.build import build_stage1
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.noise import keyed_normal
from tsvae_dist.stages._common import commit_trained, ensure_dataset_once
from tsvae_dist.train.checkpoint import resume_config
from tsvae_dist.train.loop import TrainJob, train

STAGE = "stage1"


def run(cfg: RunConfig) -> str:
    """Train stage 1 (resuming if checkpoints exist); returns the URL of the trained model."""
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0, timeout_s=cfg.cluster.init_timeout_s,
                     collective_timeout_s=cfg.cluster.collective_timeout_s)
    data_manifest = ensure_dataset_once(cfg, info)
    layout = cfg.layout

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every world size
    model = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution, gamma=cfg.stage1.gamma)
    loader = StreamLoader(cfg.dataset_root, "train", global_batch=cfg.stage1.batch_size, rank=info.rank,
                          world=info.world_size, cfg=cfg.stage1.loader, seed=cfg.seed,
                          pin_memory=info.device.type == "cuda")  # async copies to the GPU
    latent_dim = cfg.model.latent_dim

    def inputs(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, ...]:
        # z = μ + σ·ε with ε keyed by (seed, sample, epoch): independent of rank and batch layout.
        return batch["image"], keyed_normal(batch["key"], latent_dim, cfg.seed, STAGE, epoch)

    job = TrainJob(name=STAGE, model=model, loader=loader, inputs=inputs, layout=layout,
                   resume_config=resume_config(cfg, STAGE, loader.streams))
    result = train(job, cfg.stage1, info)

    dataset_manifest = manifest_url(cfg.dataset_root)
    consumed = {"dataset": {**records.artifact(dataset_manifest), "name": data_manifest["name"]}}
    return commit_trained(cfg, STAGE, result, info, consumed)
