"""Encoding job throughput vs the bare encoder forward pass, in the same run (target ratio >= 0.9).

The job (`tsvae_dist.stages.encode.run`, one process) reads the image shards, decodes them in loader
workers, encodes them in chunks and writes latent shards with done markers and the manifests; the
bare pass calls `model.encode` on the same images already in memory as float tensors, with the
same chunk size and thread count. Default: the paper's CelebA-64 network (InfoGAN, κ = 64) on
synthetic 64-px images with random weights (speed does not depend on them).

    .venv/bin/python benchmarks/bench_encode.py [--images 8192] [--resolution 64] [--width 1.0]
        [--latent-dim 64] [--batch 256] [--workers 2] [--threads 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tsvae_dist import storage
from tsvae_dist.cli import compose
from tsvae_dist.config import to_container
from tsvae_dist.data.prefetch import decode_image_shard
from tsvae_dist.data.synthetic import build_synthetic
from tsvae_dist.data.workers import unit_float
from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.io import save_model
from tsvae_dist.runtime.preemption import StopFlag
from tsvae_dist.stages import encode


def _bare_forward(model: torch.nn.Module, images: np.ndarray, batch: int) -> float:
    """Samples/s of `model.encode` alone over the images (uint8 → float outside the timing)."""
    x = unit_float(images)
    with torch.no_grad():
        model.encode(x[:batch])  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model.encode(x[i:i + batch])
        return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192, help="images in the dataset (train + test)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0, help="model.width (1.0 = the paper's network)")
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="eval.batch_size: the encoding chunk")
    parser.add_argument("--per-shard", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="eval.workers: decoding processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each; best reported")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        test = max(args.per_shard, args.images // 8)
        build_synthetic(str(data), resolution=args.resolution, train=args.images - test, test=test,
                        samples_per_shard=args.per_shard)
        cfg = compose([f"run_dir={run}", f"dataset.root={data}", f"dataset.resolution={args.resolution}",
                       f"model.width={args.width}", f"model.latent_dim={args.latent_dim}",
                       f"eval.batch_size={args.batch}", f"eval.workers={args.workers}",
                       f"dataset.synthetic_train={args.images - test}", f"dataset.synthetic_test={test}",
                       f"dataset.synthetic_samples_per_shard={args.per_shard}"])
        torch.manual_seed(0)
        model = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution).eval()
        storage.makedirs(str(run / "stage1"))
        save_model(cfg.layout.model("stage1"), model, to_container(cfg), "stage1", samples_seen=0)

        # The bare forward pass first, on every image in memory.
        images = np.concatenate([decode_image_shard(str(data), entry, [3, args.resolution, args.resolution])[1]
                                 for split in ("train", "test")
                                 for entry in json.loads((data / "manifest.json").read_text())["splits"][split]
                                 ["shards"]])
        # Alternate the bare pass and the whole encoding job (model load, dataset check, shards, markers,
        # manifests), from scratch each time; the best of each is the least disturbed by other load.
        bare, job = [], []
        for _ in range(args.repeats):
            bare.append(_bare_forward(model, images, args.batch))
            shutil.rmtree(run / "encode", ignore_errors=True)
            start = time.perf_counter()
            encode.run(cfg, stop=StopFlag())
            job.append(len(images) / (time.perf_counter() - start))

    print(f"images {len(images)} at {args.resolution}px, infogan width {args.width}, latent {args.latent_dim}, "
          f"batch {args.batch}, workers {args.workers}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"bare encoder forward: {max(bare):8.1f} samples/s  (all: {', '.join(f'{v:.0f}' for v in bare)})")
    print(f"encoding job:         {max(job):8.1f} samples/s  (all: {', '.join(f'{v:.0f}' for v in job)})")
    print(f"ratio job / bare:     {max(job) / max(bare):8.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
