"""FID feature extraction: sharded over gloo processes vs one process, in the same run.

Each rank extracts its share of the images into float64 sufficient statistics, which one
all-reduce combines; the single process loops over all images with every core. Random weights
(speed does not depend on them), uint8 images resized to 299 by the TF1 rule.

    .venv/bin/python benchmarks/bench_fid.py [--images 64] [--size 64] [--batch 16] [--world 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tsvae_dist.fid.inception import FEATURE_DIM, InceptionNet, extract_features
from tsvae_dist.fid.stats import FeatureStats


def _images(n: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def _net() -> InceptionNet:
    """Random weights with BN statistics calibrated on one batch, so that features are not constant."""
    torch.manual_seed(0)
    net = InceptionNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running stats := this batch's statistics
    with torch.no_grad():
        net.train()(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    return net.eval()


def _extract(net: InceptionNet, images: torch.Tensor, batch: int) -> FeatureStats:
    stats = FeatureStats(FEATURE_DIM)
    for start in range(0, len(images), batch):
        stats.add(extract_features(net, images[start:start + batch]))
    return stats


def _rank(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores are split between ranks
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        net = _net()
        mine = _images(args.images, args.size).tensor_split(world)[rank]  # uneven if it does not divide
        _extract(net, mine[:1], args.batch)  # warm-up
        dist.barrier()
        start = time.perf_counter()
        stats = _extract(net, mine, args.batch)
        rank_s = time.perf_counter() - start
        total = stats.all_reduce()
        wall_s = time.perf_counter() - start  # every rank waits in the all-reduce for the slowest
        mu, sigma = total.mean_cov()
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump({"images": len(mine), "rank_s": rank_s, "wall_s": wall_s}, f)
        if rank == 0:
            np.savez(os.path.join(tmp, "sharded.npz"), mu=mu, sigma=sigma, count=total.count)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images in all")
    parser.add_argument("--size", type=int, default=64, help="input side, resized to 299")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass")
    parser.add_argument("--world", type=int, default=2, help="gloo processes of the sharded run")
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    net, images = _net(), _images(args.images, args.size)
    _extract(net, images[:1], args.batch)  # warm-up
    start = time.perf_counter()
    single = _extract(net, images, args.batch)
    single_s = time.perf_counter() - start
    single_rate = args.images / single_s
    print(f"single process ({threads} threads): {args.images} images in {single_s:.2f} s = "
          f"{single_rate:.2f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.world, args, tmp), nprocs=args.world)
        ranks = []
        for r in range(args.world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
        with np.load(os.path.join(tmp, "sharded.npz"), allow_pickle=False) as out:
            mu, sigma, count = out["mu"], out["sigma"], int(out["count"])

    for r, info in enumerate(ranks):
        rate = info["images"] / info["rank_s"]
        print(f"rank {r} ({max(1, threads // args.world)} threads): {info['images']} images in "
              f"{info['rank_s']:.2f} s = {rate:.2f} images/s, {rate / single_rate:.2f}x the single process")
    wall = max(info["wall_s"] for info in ranks)
    print(f"sharded ({args.world} ranks, incl. all-reduce): {args.images} images in {wall:.2f} s = "
          f"{args.images / wall:.2f} images/s, {single_s / wall:.2f}x the single process")

    single_mu, single_sigma = single.mean_cov()
    assert count == single.count == args.images
    print(f"sharded vs single statistics: max |d mu| {np.abs(mu - single_mu).max():.2e}, max |d sigma| "
          f"{np.abs(sigma - single_sigma).max():.2e} (max |sigma| {np.abs(single_sigma).max():.2e})")


if __name__ == "__main__":
    main()
