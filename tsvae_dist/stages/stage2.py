"""Stage 2: train the second VAE on stage-1 latents z = μ + σ·ε, with fresh ε every epoch.

Refuses latents made by another encoder than the run's stage-1 model (their manifest records the
encoder's SHA-256).
"""

from __future__ import annotations

from typing import Any

import torch

from tsvae_dist import records
from tsvae_dist.config import RunConfig
from tsvae_dist.data.loader import StreamLoader
from tsvae_dist.data.shardformat import manifest_url, read_manifest
from tsvae_dist.errors import CheckpointError
from tsvae_dist.models.build import build_stage2
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.noise import keyed_normal
from tsvae_dist.stages._common import commit_trained
from tsvae_dist.train.checkpoint import resume_config
from tsvae_dist.train.loop import TrainJob, train

STAGE = "stage2"


def check_latents(cfg: RunConfig) -> dict[str, Any]:
    """The latent shards' manifest, after checking they come from this run's stage-1 model."""
    layout = cfg.layout
    latents = read_manifest(layout.latents)
    encoder_url = layout.model("stage1")
    have, want = latents.get("encoder", {}).get("sha256"), records.sha256_of(encoder_url)
    if have != want:
        raise CheckpointError(
            f"{manifest_url(layout.latents)}: latents were made by encoder sha256={have}, but "
            f"{encoder_url} has sha256={want}; re-run the encode stage"
        )
    return latents


def run(cfg: RunConfig) -> str:
    """Train stage 2 (resuming if checkpoints exist); returns the URL of the trained model."""
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0, timeout_s=cfg.cluster.init_timeout_s,
                     collective_timeout_s=cfg.cluster.collective_timeout_s)
    latents = check_latents(cfg)
    layout = cfg.layout

    torch.manual_seed(cfg.seed + 1)
    model = build_stage2(cfg.model, gamma=cfg.stage2.gamma)
    loader = StreamLoader(layout.latents, "train", global_batch=cfg.stage2.batch_size, rank=info.rank,
                          world=info.world_size, cfg=cfg.stage2.loader, seed=cfg.seed,
                          pin_memory=info.device.type == "cuda")  # async copies to the GPU
    latent_dim = cfg.model.latent_dim

    def inputs(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, ...]:
        # A fresh z per epoch from the stored posterior, and the stage-2 ε, both keyed by sample.
        eps_z = keyed_normal(batch["key"], latent_dim, cfg.seed, "stage2-z", epoch)
        z = batch["mu"] + batch["log_sigma"].exp() * eps_z
        return z, keyed_normal(batch["key"], latent_dim, cfg.seed, STAGE, epoch)

    job = TrainJob(name=STAGE, model=model, loader=loader, inputs=inputs, layout=layout,
                   resume_config=resume_config(cfg, STAGE, loader.streams))
    result = train(job, cfg.stage2, info)

    consumed = {"latents": records.artifact(manifest_url(layout.latents)), "encoder": latents["encoder"]}
    return commit_trained(cfg, STAGE, result, info, consumed)
