"""Encode: the stage-1 encoder's μ and log σ for every sample, as latent shards for stage 2.

Each rank encodes whole input shards (shard i on rank i mod world) and writes one latent shard per
input shard under the same name, then a done marker naming the encoder and the input shard's hash.
Every shard is encoded in the same fixed chunks (`eval.batch_size`) whichever rank handles it, so
the output is byte-identical for any world size; a re-run or requeue skips shards whose marker
matches. DataLoader workers read and decode the next shards while the encoder runs, and the ranks
agree on a stop signal between shards (the finished shards stay done; `Preempted` is raised).
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tsvae_dist import records, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.data.prefetch import ShardPrefetcher
from tsvae_dist.data.shardformat import encode_latent, manifest_url
from tsvae_dist.data.workers import unit_float_on
from tsvae_dist.data.writer import finish_dataset, write_shard
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.preemption import Preempted, StopFlag
from tsvae_dist.stages._common import ensure_dataset_once, load_trained
from tsvae_dist.train import precision

log = logging.getLogger(__name__)
STAGE = "encode"
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: np.ndarray, chunk: int, precision_name: str,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """μ and log σ (float32 [N, κ] each) of uint8 images, encoded in fixed chunks."""
    if len(images) == 0:  # every sample of the shard was bad (and skipped)
        kappa = model.encode(torch.zeros(1, *images.shape[1:], device=device))[0].shape[1]
        return np.zeros((0, kappa), np.float32), np.zeros((0, kappa), np.float32)
    mus, log_sigmas = [], []
    for start in range(0, len(images), chunk):
        x = unit_float_on(torch.from_numpy(images[start:start + chunk]), device)
        with precision.autocast(precision_name, device):
            mu, log_sigma = model.encode(x)
        mus.append(mu.float().cpu().numpy())
        log_sigmas.append(log_sigma.float().cpu().numpy())
    return np.concatenate(mus), np.concatenate(log_sigmas)


def _marker_matches(done_url: str, encoder_sha: str, source_sha: str) -> bool:
    if not storage.exists(done_url):
        return False
    marker = json.loads(storage.read_text(done_url))
    return marker.get("encoder") == encoder_sha and marker.get("source_sha256") == source_sha


def _write_output(out_root: str, name: str, keys: list[str], mu: np.ndarray, log_sigma: np.ndarray,
                  encoder_sha: str, source_sha: str, skipped: int) -> None:
    """The latent shard, then its done marker (both atomic: a kill in between leaves no marker)."""
    records = [(key, encode_latent(mu[i], log_sigma[i])) for i, key in enumerate(keys)]
    count, sha = write_shard(storage.join(out_root, name), records)
    marker = {"name": name, "count": count, "sha256": sha, "encoder": encoder_sha, "source_sha256": source_sha,
              "skipped": skipped}  # bad input samples left out (stage1.loader.max_skipped_samples)
    storage.write_text_atomic(storage.join(out_root, name + ".done"), json.dumps(marker))


def _todo(out_root: str, shards: list[dict[str, Any]], rank: int, world: int, encoder_sha: str
          ) -> list[dict[str, Any]]:
    """This rank's shards (shard i on rank i mod world) without a matching done marker."""
    mine = [e for i, e in enumerate(shards) if i % world == rank]
    return [e for e in mine if not _marker_matches(storage.join(out_root, e["name"] + ".done"), encoder_sha,
                                                     e["sha256"])]


def encode_split(cfg: RunConfig, info: dist.DistInfo, split: str, shards: list[dict[str, Any]],
                 todo: list[dict[str, Any]], decoded: ShardPrefetcher, model: torch.nn.Module, encoder_sha: str,
                 stop: StopFlag) -> None:
    """Encode this rank's unfinished shards of `split` (`todo`, read from `decoded` in that order).

    The ranks go through the split in rounds (round r: shard r·world + rank) and agree on stopping
    before each round, so every rank makes the same number of collective calls.
    """
    out_root = cfg.layout.latents
    todo_names = {e["name"] for e in todo}
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer:  # writing overlaps the next shard's encoding
        for r in range(-(-len(shards) // info.world_size)):
            if dist.any_rank(stop.is_set(), info.device):
                for w in writes:
                    w.result()
                raise Preempted(f"encode: stopped by {stop.signal_name or 'request'} in split {split}, round {r}")
            index = r * info.world_size + info.rank
            if index >= len(shards) or shards[index]["name"] not in todo_names:
                continue
            before = decoded.skipped
            name, keys, images = next(decoded)
            assert name == shards[index]["name"], f"encode: read {name}, expected {shards[index]['name']}"
            mu, log_sigma = encode_images(model, images, cfg.eval.batch_size, cfg.stage1.precision, info.device)
            writes.append(writer.submit(_write_output, out_root, name, keys, mu, log_sigma, encoder_sha,
                                        shards[index]["sha256"], decoded.skipped - before))
        for w in writes:
            w.result()  # re-raises a failed write


def run(cfg: RunConfig, stop: StopFlag | None = None) -> str:
    """Encode every split; returns the URL of the latent shards' directory."""
    stop = stop or StopFlag().install()
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0, timeout_s=cfg.cluster.init_timeout_s)
    data = ensure_dataset_once(cfg, info)
    encoder_url = cfg.layout.model("stage1")
    artifact = storage.read_bytes(encoder_url)
    encoder_sha = hashlib.sha256(artifact).hexdigest()
    out_root = cfg.layout.latents

    # Decoding of this rank's unfinished shards (both splits, in order) starts before the model loads.
    todo = {split: _todo(out_root, data["splits"][split]["shards"], info.rank, info.world_size, encoder_sha)
            for split in SPLITS}
    for split in SPLITS:
        skipped = len(range(info.rank, len(data["splits"][split]["shards"]), info.world_size)) - len(todo[split])
        if skipped:
            log.info("encode %s: rank %d skips %d finished shard(s)", split, info.rank, skipped)
    entries = [e for split in SPLITS for e in todo[split]]
    with ShardPrefetcher(cfg.dataset_root, entries, list(data["shape"]), cfg.eval.workers,
                         cfg.stage1.loader.max_skipped_samples, info.rank, data.get("decode")) as decoded:
        model = load_trained(cfg, "stage1", artifact).to(info.device)
        for split in SPLITS:
            encode_split(cfg, info, split, data["splits"][split]["shards"], todo[split], decoded, model, encoder_sha,
                         stop)
    dist.barrier()

    # Rank 0 assembles the latent manifest from the done markers, in the input manifest's order.
    if info.is_main:
        splits, bad_samples = {}, 0
        for split in SPLITS:
            shards = []
            for entry in data["splits"][split]["shards"]:
                marker = json.loads(storage.read_text(storage.join(out_root, entry["name"] + ".done")))
                bad_samples += marker.get("skipped", 0)
                if marker["count"] == 0:  # every sample of the input shard was bad and skipped
                    continue
                shards.append({"name": marker["name"], "count": marker["count"], "sha256": marker["sha256"]})
            splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
        dataset_manifest = manifest_url(cfg.dataset_root)
        finish_dataset(out_root, name=f"{data['name']}-latents", kind="latent", shape=[cfg.model.latent_dim],
                       splits=splits, source={"dataset": records.artifact(dataset_manifest)},
                       encoder={"url": encoder_url, "sha256": encoder_sha})
        records.write(cfg, STAGE,
                      consumed={"dataset": records.artifact(dataset_manifest),
                                "encoder": {"url": encoder_url, "sha256": encoder_sha}},
                      produced={"latents": records.artifact(manifest_url(out_root))},
                      extra={"skipped_samples": bad_samples})
    dist.barrier()
    return out_root
