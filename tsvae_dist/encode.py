"""Encode: the stage-1 encoder's μ and log σ for every sample, as latent shards for stage 2.

Each rank encodes whole input shards (shard i on rank i mod world) and writes one latent shard
per input shard under the same name, followed by a done marker. Each shard is encoded in the same
fixed chunks whichever rank handles it, so the output is byte-identical for any world size, and a
re-run or requeue skips shards whose marker names the same encoder.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from tsvae_dist import dist, manifest, precision, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.datasets import ensure_dataset_once
from tsvae_dist.loader import iter_split_shards
from tsvae_dist.models import build_stage1, build_stage2
from tsvae_dist.shardformat import encode_latent, write_manifest
from tsvae_dist.stage1 import model_url

STAGE = "encode"
SPLITS = ("train", "test")


def latents_root(cfg: RunConfig) -> str:
    return storage.join(manifest.stage_dir(cfg, STAGE), "latents")


def load_model(cfg: RunConfig, stage: str) -> torch.nn.Module:
    """A trained stage model from its artifact, in eval mode on the CPU."""
    body = torch.load(io.BytesIO(storage.read_bytes(model_url(cfg, stage))), map_location="cpu", weights_only=True)
    if stage == "stage1":
        model = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution)
    else:
        model = build_stage2(cfg.model)
    model.load_state_dict(body["model"])
    return model.eval()


@torch.no_grad()
def encode_shard(model: torch.nn.Module, samples: list[tuple[str, dict[str, Any]]], chunk: int,
                 precision_name: str, device: torch.device) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) latent records for one shard's samples, encoded in fixed chunks."""
    records = []
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        x = torch.stack([s["image"] for _, s in part]).to(device)
        with precision.autocast(precision_name, device):
            mu, log_sigma = model.encode(x)
        mu, log_sigma = mu.float().cpu().numpy(), log_sigma.float().cpu().numpy()
        for i, (key, _) in enumerate(part):
            records.append((key, encode_latent(mu[i], log_sigma[i])))
    return records


def run(cfg: RunConfig) -> str:
    """Encode every split; returns the URL of the latent shards' directory."""
    from shards.writer import write_shard

    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0)
    data = ensure_dataset_once(cfg, info)
    encoder_url = model_url(cfg, "stage1")
    encoder_sha = manifest.sha256_of(encoder_url)
    model = load_model(cfg, "stage1").to(info.device)
    out_root = latents_root(cfg)

    # Encode this rank's shards, skipping those already done by the same encoder.
    for split in SPLITS:
        for shard_name, samples in iter_split_shards(cfg.dataset_root, split, info.rank, info.world_size):
            out_url, done_url = storage.join(out_root, shard_name), storage.join(out_root, shard_name + ".done")
            if storage.exists(done_url) and json.loads(storage.read_text(done_url))["encoder"] == encoder_sha:
                continue
            records = encode_shard(model, list(samples), cfg.eval.batch_size, cfg.stage1.precision, info.device)
            count, sha = write_shard(out_url, records)
            marker = {"name": shard_name, "count": count, "sha256": sha, "encoder": encoder_sha}
            storage.write_text_atomic(done_url, json.dumps(marker))
    dist.barrier()

    # Rank 0 assembles the latent manifest from the done markers, in the input manifest's order.
    if info.is_main:
        splits = {}
        for split in SPLITS:
            shards = []
            for entry in data["splits"][split]["shards"]:
                marker = json.loads(storage.read_text(storage.join(out_root, entry["name"] + ".done")))
                shards.append({"name": marker["name"], "count": marker["count"], "sha256": marker["sha256"]})
            splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
        dataset_manifest = storage.join(cfg.dataset_root, "manifest.json")
        write_manifest(out_root, {
            "format": "tsvae-shards/1", "name": f"{data['name']}-latents", "kind": "latent",
            "shape": [cfg.model.latent_dim], "dtype": "float32", "splits": splits,
            "source": {"dataset": manifest.artifact(dataset_manifest)},
            "encoder": {"url": encoder_url, "sha256": encoder_sha},
        })
        manifest.write(cfg, STAGE,
                       consumed={"dataset": manifest.artifact(dataset_manifest),
                                 "encoder": {"url": encoder_url, "sha256": encoder_sha}},
                       produced={"latents": manifest.artifact(storage.join(out_root, "manifest.json"))})
    dist.barrier()
    return out_root


if __name__ == "__main__":
    from tsvae_dist.cli import main

    main(run)
