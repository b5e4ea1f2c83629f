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
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tsvae_dist import dist, manifest, precision, shardformat, storage
from tsvae_dist.config import RunConfig
from tsvae_dist.datasets import ensure_dataset_once
from tsvae_dist.errors import CheckpointError, DataError
from tsvae_dist.models import build_stage1, build_stage2
from tsvae_dist.preemption import Preempted, StopFlag
from tsvae_dist.shardformat import encode_latent, write_manifest
from tsvae_dist.stage1 import model_url

log = logging.getLogger(__name__)
STAGE = "encode"
SPLITS = ("train", "test")


def latents_root(cfg: RunConfig) -> str:
    return storage.join(manifest.stage_dir(cfg, STAGE), "latents")


def load_model(cfg: RunConfig, stage: str, artifact: bytes | None = None) -> torch.nn.Module:
    """A trained stage model from its artifact (`artifact`: its bytes, if already read), in eval mode on the CPU.

    The modules are built on the meta device and take every tensor from the artifact: no time is
    spent on a random initialisation that would be overwritten (seconds for the large networks).
    """
    data = artifact if artifact is not None else storage.read_bytes(model_url(cfg, stage))
    body = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    gamma = "optimal" if "gamma_ema" in body["model"] else "learned"  # the artifact's γ mode sets its keys
    with torch.device("meta"):
        if stage == "stage1":
            model = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution, gamma=gamma)
        else:
            model = build_stage2(cfg.model, gamma=gamma)
    model.load_state_dict(body["model"], assign=True)
    empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise CheckpointError(f"{model_url(cfg, stage)}: no values for {empty[:3]} (not in the state dict)")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Reading image shards ahead of the model


def decode_image_shard(root: str, entry: dict[str, Any], shape: list[int]) -> tuple[list[str], np.ndarray]:
    """Keys and uint8 [N, C, H, W] images of one image shard, in file order (hash and count checked)."""
    url = shardformat.shard_url(root, entry["name"])
    keys, images = [], []
    for key, files in shardformat.iter_tar(url, sha256=entry["sha256"], count=entry["count"]):
        keys.append(key)
        images.append(shardformat.decode_sample(url, key, files, "image", shape)["image"])
    return keys, np.stack(images) if images else np.zeros((0, *shape), np.uint8)


def unit_float(images: np.ndarray) -> torch.Tensor:
    """uint8 → float32 in [0, 1], exactly as the training loader converts (one IEEE division)."""
    return torch.from_numpy(np.divide(images, np.float32(255.0), dtype=np.float32))


_ERROR = "\x00error"  # the name of an item that carries a worker's DataError (never a shard name)


class _ShardReader(IterableDataset):
    """Decoded shards in the given order; worker w of W decodes shards w, w+W, ... (the DataLoader
    hands them back round-robin, i.e. in the original order)."""

    def __init__(self, root: str, entries: list[dict[str, Any]], shape: list[int]):
        self.root, self.entries, self.shape = root, entries, shape

    def __iter__(self) -> Iterator[tuple[str, list[str], np.ndarray | torch.Tensor]]:
        info = get_worker_info()
        mine = self.entries if info is None else self.entries[info.id::info.num_workers]
        for entry in mine:
            try:
                keys, images = decode_image_shard(self.root, entry, self.shape)
            except DataError as e:
                if info is None:
                    raise
                # To the main process as data, raised there with its one-line message (no worker traceback).
                yield _ERROR, [str(e)], None
                return
            # From a worker, a tensor: it crosses to the main process through shared memory, not the pipe.
            yield entry["name"], keys, images if info is None else torch.from_numpy(images)


def _as_is(item: Any) -> Any:
    """The DataLoader's item conversion: none."""
    return item


class ShardPrefetcher:
    """(name, keys, uint8 [N, C, H, W] images) of each shard in `entries`, in order, decoded ahead by
    `workers` processes (0: in this one, on demand). A context manager: leaving it stops the workers,
    however the block ends (left to the garbage collector, torch's shutdown can find its queues
    already finalised and wait 5 s per worker)."""

    def __init__(self, root: str, entries: list[dict[str, Any]], shape: list[int], workers: int):
        reader = _ShardReader(root, entries, shape)
        if workers == 0 or not entries:
            self._items: Iterator = iter(reader)
        else:
            self._items = iter(DataLoader(reader, batch_size=None, collate_fn=_as_is,
                                          num_workers=min(workers, len(entries)), prefetch_factor=2,
                                          multiprocessing_context="fork"))

    def __iter__(self) -> ShardPrefetcher:
        return self

    def __next__(self) -> tuple[str, list[str], np.ndarray]:
        name, keys, images = next(self._items)
        if name == _ERROR:
            raise DataError(keys[0])
        return name, keys, images.numpy() if isinstance(images, torch.Tensor) else images

    def __enter__(self) -> ShardPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        shutdown = getattr(self._items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# ---------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: np.ndarray, chunk: int, precision_name: str,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """μ and log σ (float32 [N, κ] each) of uint8 images, encoded in fixed chunks."""
    mus, log_sigmas = [], []
    for start in range(0, len(images), chunk):
        x = unit_float(images[start:start + chunk]).to(device, non_blocking=True)
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
                  encoder_sha: str, source_sha: str) -> None:
    """The latent shard, then its done marker (both atomic: a kill in between leaves no marker)."""
    from shards.writer import write_shard

    records = [(key, encode_latent(mu[i], log_sigma[i])) for i, key in enumerate(keys)]
    count, sha = write_shard(storage.join(out_root, name), records)
    marker = {"name": name, "count": count, "sha256": sha, "encoder": encoder_sha, "source_sha256": source_sha}
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
    out_root = latents_root(cfg)
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
            name, keys, images = next(decoded)
            assert name == shards[index]["name"], f"encode: read {name}, expected {shards[index]['name']}"
            mu, log_sigma = encode_images(model, images, cfg.eval.batch_size, cfg.stage1.precision, info.device)
            writes.append(writer.submit(_write_output, out_root, name, keys, mu, log_sigma, encoder_sha,
                                        shards[index]["sha256"]))
        for w in writes:
            w.result()  # re-raises a failed write


def run(cfg: RunConfig, stop: StopFlag | None = None) -> str:
    """Encode every split; returns the URL of the latent shards' directory."""
    stop = stop or StopFlag().install()
    info = dist.init(use_gpu=cfg.cluster.gpus_per_node > 0)
    data = ensure_dataset_once(cfg, info)
    encoder_url = model_url(cfg, "stage1")
    artifact = storage.read_bytes(encoder_url)
    encoder_sha = hashlib.sha256(artifact).hexdigest()
    out_root = latents_root(cfg)

    # Decoding of this rank's unfinished shards (both splits, in order) starts before the model loads.
    todo = {split: _todo(out_root, data["splits"][split]["shards"], info.rank, info.world_size, encoder_sha)
            for split in SPLITS}
    for split in SPLITS:
        skipped = len(range(info.rank, len(data["splits"][split]["shards"]), info.world_size)) - len(todo[split])
        if skipped:
            log.info("encode %s: rank %d skips %d finished shard(s)", split, info.rank, skipped)
    entries = [e for split in SPLITS for e in todo[split]]
    with ShardPrefetcher(cfg.dataset_root, entries, list(data["shape"]), cfg.eval.workers) as decoded:
        model = load_model(cfg, "stage1", artifact).to(info.device)
        for split in SPLITS:
            encode_split(cfg, info, split, data["splits"][split]["shards"], todo[split], decoded, model, encoder_sha,
                         stop)
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
