"""Stage 2: train the second VAE on stage-1 latents z = μ + σ·ε, with fresh ε every epoch.

Refuses latents made by another encoder than the run's stage-1 model (their manifest records the
encoder's SHA-256).
"""

from __future__ import annotations

from typing import Any

import torch

from tsvae_dist import dist, encode, manifest, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import CheckpointError
from tsvae_dist.loader import StreamLoader
from tsvae_dist.models import build_stage2
from tsvae_dist.noise import keyed_normal
from tsvae_dist.shardformat import read_manifest
from tsvae_dist.stage1 import model_url, resume_config, save_model
from tsvae_dist.trainer import TrainJob, train

STAGE = "stage2"


def check_latents(cfg: RunConfig) -> dict[str, Any]:
    """The latent shards' manifest, after checking they come from this run's stage-1 model."""
    latents = read_manifest(encode.latents_root(cfg))
    encoder_url = model_url(cfg, "stage1")
    have, want = latents.get("encoder", {}).get("sha256"), manifest.sha256_of(encoder_url)
    if have != want:
        raise CheckpointError(
            f"{encode.latents_root(cfg)}/manifest.json: latents were made by encoder sha256={have}, but "
            f"{encoder_url} has sha256={want}; re-run the encode stage"
        )
    return latents


def run(cfg: RunConfig) -> str:
    """Train stage 2 (resuming if checkpoints exist); returns the URL of the trained model."""
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0)
    latents = check_latents(cfg)

    torch.manual_seed(cfg.seed + 1)
    model = build_stage2(cfg.model, gamma=cfg.stage2.gamma)
    loader = StreamLoader(encode.latents_root(cfg), "train", global_batch=cfg.stage2.batch_size, rank=info.rank,
                          world=info.world_size, cfg=cfg.stage2.loader, seed=cfg.seed)
    latent_dim = cfg.model.latent_dim

    def inputs(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, ...]:
        # A fresh z per epoch from the stored posterior, and the stage-2 ε, both keyed by sample.
        eps_z = keyed_normal(batch["key"], latent_dim, cfg.seed, "stage2-z", epoch)
        z = batch["mu"] + batch["log_sigma"].exp() * eps_z
        return z, keyed_normal(batch["key"], latent_dim, cfg.seed, STAGE, epoch)

    job = TrainJob(name=STAGE, model=model, loader=loader, inputs=inputs, directory=manifest.stage_dir(cfg, STAGE),
                   resume_config=resume_config(cfg, STAGE, loader))
    result = train(job, cfg.stage2, info)

    url = model_url(cfg, STAGE)
    if info.is_main:
        save_model(url, result.model, cfg, STAGE, result.samples_seen)
        latents_manifest = storage.join(encode.latents_root(cfg), "manifest.json")
        manifest.write(
            cfg, STAGE,
            consumed={"latents": manifest.artifact(latents_manifest), "encoder": latents["encoder"]},
            produced={"model": manifest.artifact(url)},
            extra={"metrics": result.last_metrics, "samples_seen": result.samples_seen},
        )
    dist.barrier()
    return url


if __name__ == "__main__":
    from tsvae_dist.cli import main

    main(run)
