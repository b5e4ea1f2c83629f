"""Stage-1 training throughput: our trainer vs a plain single-process PyTorch loop, in one run.

Both train the same model (same config, same initial weights) for the same number of steps; the
plain loop reads batches from in-memory tensors, ours streams the shards through the loader with
keyed noise, metrics and checkpoints. Printed as a ratio (target >= 0.95).

    python benchmarks/bench_trainer.py [--resolution 32] [--width 0.5] [--steps 60] [--precision fp32]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from tsvae_dist.config import LoaderConfig, TrainConfig
from tsvae_dist.data.loader import StreamLoader
from tsvae_dist.data.synthetic import build_synthetic
from tsvae_dist.layout import RunLayout
from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.config import ModelConfig
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.noise import keyed_normal
from tsvae_dist.runtime.preemption import StopFlag
from tsvae_dist.train.loop import TrainJob, train
from tsvae_dist.train.precision import autocast


def plain_loop(model: torch.nn.Module, images: torch.Tensor, steps: int, batch: int, latent_dim: int,
               precision: str, device: torch.device) -> float:
    """Samples/s of the textbook loop over in-memory tensors."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        j = (i * batch) % (len(images) - batch + 1)
        x = images[j:j + batch].to(device)
        eps = torch.randn(batch, latent_dim, device=device)
        with autocast(precision, device):
            loss = model(x, eps)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


WORKERS = 1  # loader worker processes of our trainer (--workers)


def our_trainer(model: torch.nn.Module, root: str, steps_per_epoch: int, epochs: int, batch: int,
                latent_dim: int, precision: str, workdir: str, info: dist.DistInfo) -> float:
    """Samples/s of tsvae_dist.train.loop.train (loader, keyed noise, metrics, checkpoints)."""
    cfg = TrainConfig(batch_size=batch, epochs=epochs, lr=1e-4, precision=precision, progress_bar=False,
                      checkpoint_every_steps=10**9, log_every_steps=10,
                      loader=LoaderConfig(workers=WORKERS, streams=1))
    loader = StreamLoader(root, "train", global_batch=batch, rank=0, world=1, cfg=cfg.loader, seed=0)

    def inputs(b, epoch):
        return b["image"], keyed_normal(b["key"], latent_dim, 0, "stage1", epoch)

    job = TrainJob("stage1", model, loader, inputs, RunLayout(workdir), {"bench": True})
    start = time.perf_counter()
    train(job, cfg, info, StopFlag())
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    return loader.steps_per_epoch * epochs * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--workers", type=int, default=1, help="loader worker processes of our trainer")
    args = p.parse_args()
    global WORKERS
    WORKERS = args.workers
    if args.threads:
        torch.set_num_threads(args.threads)
    info = dist.init()
    mcfg = ModelConfig(width=args.width, latent_dim=16)
    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/data"
        build_synthetic(root, resolution=args.resolution, train=args.images, test=64, samples_per_shard=256)
        loader = StreamLoader(root, "train", global_batch=args.batch, rank=0, world=1,
                              cfg=LoaderConfig(workers=0, streams=1), seed=0)
        images = torch.cat([b["image"] for b in loader.epoch(0)])
        steps = loader.steps_per_epoch * args.epochs

        torch.manual_seed(0)
        model = build_stage1(mcfg, 3, args.resolution).to(info.device)
        plain_loop(model, images, 5, args.batch, 16, args.precision, info.device)  # warm-up
        baseline = plain_loop(model, images, steps, args.batch, 16, args.precision, info.device)
        torch.manual_seed(0)
        ours = our_trainer(build_stage1(mcfg, 3, args.resolution), root, loader.steps_per_epoch, args.epochs,
                           args.batch, 16, args.precision, f"{tmp}/run", info)
    device = torch.cuda.get_device_name() if info.device.type == "cuda" else platform.processor() or "cpu"
    print(f"machine: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"stage 1, {args.resolution} px, width {args.width}, batch {args.batch}, {args.precision}, {steps} steps")
    print(f"plain loop (in-memory tensors): {baseline:8.1f} samples/s")
    print(f"tsvae_dist trainer (shards)   : {ours:8.1f} samples/s")
    print(f"ratio trainer / plain         : {ours / baseline:8.3f}  (target >= 0.95; {WORKERS} loader workers)")


if __name__ == "__main__":
    main()
