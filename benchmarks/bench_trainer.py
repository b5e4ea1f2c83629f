"""Stage-1 training throughput: our trainer vs a plain single-process PyTorch loop, in one run.

Both train the same model (same config, same initial weights) for the same number of steps; the
plain loop reads batches from in-memory tensors, ours streams the shards through the loader with
keyed noise, metrics and checkpoints. Printed as a ratio (target >= 0.95).

With `--worlds 1,2,4` it also spawns that many gloo ranks on CPU and compares, per world size, the
steady-state steps/s of our loop against a plain DistributedDataParallel + Adam loop on the same model
and per-rank batch (both over in-memory tensors: this measures the loop, not the loader), and the
step time a checkpoint every `--checkpoint-every` steps costs (as % of a checkpoint interval; target < 5 %).

    python benchmarks/bench_trainer.py [--resolution 32] [--width 0.5] [--epochs 2] [--precision fp32]
    python benchmarks/bench_trainer.py --skip-single --worlds 1,2,4 [--dist-steps 60] [--checkpoint-every 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

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


# ---------------------------------------------------------------------------------------------
# Distributed: our loop vs plain DDP on gloo ranks, and the cost of checkpoints


class TimedMemoryLoader:
    """StreamLoader's interface over in-memory tensors, recording when each batch is asked for.

    The loop asks for batch i+1 once step i (and its metrics line and checkpoint, if any) is done, so
    the gaps between requests are step times as the loop sees them, without set-up and teardown."""

    def __init__(self, images: torch.Tensor, batch: int) -> None:
        self.images, self.batch = images, batch
        self.steps_per_epoch = len(images) // batch
        self.requested: list[float] = []

    def epoch(self, epoch: int, start_step: int = 0):
        for i in range(start_step, self.steps_per_epoch):
            self.requested.append(time.perf_counter())
            sl = slice(i * self.batch, (i + 1) * self.batch)
            # Keys are text, as the shards' `__key__` values are (keyed_normal hashes their str()).
            yield {"image": self.images[sl], "key": [f"{j:08d}" for j in range(sl.start, sl.stop)]}

    def close(self) -> None:
        pass  # no worker processes


def steady_seconds(stamps: list[float], warmup: int) -> float:
    """Seconds from the start of step `warmup` to the start of the last step (its final save excluded)."""
    return stamps[-1] - stamps[warmup]


def _dist_worker(rank: int, world: int, port: int, mode: str, opts: dict, queue) -> None:
    """One rank: train `opts["steps"]` steps in `mode` (plain | ours | ours_ckpt); rank 0 reports seconds."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # ranks share the machine's cores, as GPUs' host threads would not
    info = dist.init(use_gpu=False)
    per_rank, steps, latent = opts["batch"], opts["steps"], 16
    torch.manual_seed(0)
    model = build_stage1(ModelConfig(width=opts["width"], latent_dim=latent), 3, opts["resolution"])
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data, as a sharded loader gives
    images = torch.rand(steps * per_rank, 3, opts["resolution"], opts["resolution"], generator=gen)
    if mode == "plain":
        ddp = DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        model.train()
        stamps = []
        for i in range(steps):
            stamps.append(time.perf_counter())
            x = images[i * per_rank:(i + 1) * per_rank]
            loss = ddp(x, torch.randn(per_rank, latent))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        # sync_bn off: DDP's BatchNorm is per-rank too (it broadcasts buffers; ours averages them).
        cfg = TrainConfig(batch_size=per_rank * world, epochs=1, lr=1e-4, progress_bar=False, sync_bn="off",
                          checkpoint_every_steps=opts["checkpoint_every"] if mode == "ours_ckpt" else 10**9)
        loader = TimedMemoryLoader(images, per_rank)

        def inputs(b, epoch):
            return b["image"], keyed_normal(b["key"], latent, 0, "stage1", epoch)

        workdir = dist.broadcast_object(tempfile.mkdtemp(prefix="bench-trainer-") if info.is_main else None)
        train(TrainJob("stage1", model, loader, inputs, RunLayout(workdir), {"bench": True}), cfg, info, StopFlag())
        stamps = loader.requested
        dist.barrier()
        if info.is_main:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = steady_seconds(stamps, opts["warmup"])
    if info.is_main:
        queue.put(seconds)
    dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_run(world: int, mode: str, opts: dict) -> float:
    """Steady-state seconds of rank 0 over (steps - warmup - 1) steps, `world` gloo ranks."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, world, port, mode, opts, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"{mode} on {world} ranks: exit codes {[proc.exitcode for proc in procs]}")
    return queue.get()


def distributed_table(worlds: list[int], opts: dict, repeats: int) -> Iterator[dict]:
    """Per world size (a row as soon as it is measured): plain vs ours vs ours with checkpoints, each the
    median of `repeats` runs, interleaved."""
    timed = opts["steps"] - opts["warmup"] - 1
    for world in worlds:
        runs = {"plain": [], "ours": [], "ours_ckpt": []}
        for _ in range(repeats):  # interleaved, so a load spike on the machine hits every mode alike
            for mode in runs:
                runs[mode].append(spawn_run(world, mode, opts))
        t = {mode: statistics.median(v) for mode, v in runs.items()}
        every = opts["checkpoint_every"]  # saves after steps warmup+1 .. steps-1 fall in the timed window
        checkpoints = (opts["steps"] - 1) // every - opts["warmup"] // every
        yield {
            "world": world, "plain_steps_per_s": timed / t["plain"], "ours_steps_per_s": timed / t["ours"],
            "ratio": t["plain"] / t["ours"], "ckpt_steps_per_s": timed / t["ours_ckpt"],
            "checkpoints": checkpoints,
            # Lost time per checkpoint over the time of one interval without checkpoints.
            "ckpt_cost_pct": 100 * (t["ours_ckpt"] - t["ours"]) / max(checkpoints, 1)
            / (every * t["ours"] / timed),
        }


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
    p.add_argument("--skip-single", action="store_true", help="skip the single-process shards comparison")
    p.add_argument("--worlds", default="", help="comma-separated gloo world sizes for the distributed table")
    p.add_argument("--dist-batch", type=int, default=16, help="per-rank batch of the distributed table")
    p.add_argument("--dist-steps", type=int, default=60, help="steps per distributed run")
    p.add_argument("--dist-warmup", type=int, default=5, help="steps not timed at the start of each run")
    p.add_argument("--checkpoint-every", type=int, default=20, help="checkpoint interval of the cost row")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode and world size (median)")
    args = p.parse_args()
    if not args.skip_single:
        single_process(args)
    if args.worlds:
        worlds = [int(w) for w in args.worlds.split(",")]
        opts = dict(resolution=args.resolution, width=args.width, batch=args.dist_batch, steps=args.dist_steps,
                    warmup=args.dist_warmup, checkpoint_every=args.checkpoint_every)
        print(f"distributed (gloo, CPU, 1 thread per rank, {os.cpu_count()} cores): stage 1, {args.resolution} px, "
              f"width {args.width}, per-rank batch {args.dist_batch}, {args.dist_steps} steps "
              f"({args.dist_warmup} untimed), checkpoint every {args.checkpoint_every}, median of {args.repeats}")
        print("| ranks | plain DDP steps/s | ours steps/s | ours / plain | ours + ckpt steps/s "
              "| ckpt cost % of interval |")
        print("|-------|-------------------|--------------|--------------|---------------------"
              "|-------------------------|")
        for row in distributed_table(worlds, opts, args.repeats):
            print(f"| {row['world']:5d} | {row['plain_steps_per_s']:17.2f} | {row['ours_steps_per_s']:12.2f} | "
                  f"{row['ratio']:12.3f} | {row['ckpt_steps_per_s']:19.2f} | {row['ckpt_cost_pct']:23.1f} |",
                  flush=True)
        print("targets: ours / plain >= 0.95, checkpoint cost < 5 % of an interval")


def single_process(args) -> None:
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
