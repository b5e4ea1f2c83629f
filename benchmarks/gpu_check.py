"""One-GPU check of the stage-1 hot path, in one process (under 8 minutes on one GPU).

Measures, each against a baseline run in the same process:
  * stage-1 training steps at 64/128/256 px (the celeba64/celeba128/celeba256 presets' networks) in
    fp32, bf16, bf16 + channels_last and bf16 + channels_last + torch.compile: img/s, peak memory;
  * host syncs per step of the project's loop (tsvae_dist.train.loop.train), counted as
    aten._local_scalar_dense calls plus Tensor.item / Tensor.cpu calls;
  * host-to-device batch transfer, pageable vs pinned (GB/s);
  * PNG decode rate with Pillow (images/s at 64/128/256 px);
  * checkpoint snapshot (model + Adam state to host) of the 256-px model;
  * Inception (FID) fp32 throughput at batch 500, random weights (nothing is downloaded).

Needs only torch, numpy, Pillow and the project (no webdataset, submitit or hydra), so it runs on a bare
GPU node. channels_last and compile are applied to the model here, not through the trainer's config.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from tsvae_dist.config import TrainConfig
from tsvae_dist.data.workers import unit_float_on
from tsvae_dist.fid.inception import InceptionNet, extract_features
from tsvae_dist.layout import RunLayout
from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.config import ModelConfig
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.preemption import StopFlag
from tsvae_dist.train import precision
from tsvae_dist.train.loop import TrainJob, train

# The presets' stage-1 networks (conf/dataset/celeba{64,128,256}.yaml + conf/model).
PRESETS = {64: ("infogan", 64), 128: ("resnet", 128), 256: ("resnet", 128)}
VARIANTS = [  # (name, autocast precision, channels_last, compile)
    ("fp32", "fp32", False, False),
    ("bf16", "bf16", False, False),
    ("bf16+cl", "bf16", True, False),
    ("bf16+cl+compile", "bf16", True, True),
]


def model_config(resolution: int, quick: bool) -> ModelConfig:
    family, latent = PRESETS[resolution]
    # --quick: a narrow network of the same family and depth, so the CPU smoke run takes seconds.
    return ModelConfig(family=family, latent_dim=latent, width=0.125 if quick else 1.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# Training throughput


def train_rate(resolution: int, batch: int, variant: tuple, steps: int, warmup: int, quick: bool,
               device: torch.device) -> dict[str, Any]:
    """img/s and peak memory of `steps` stage-1 steps (after `warmup`), one variant."""
    name, prec, channels_last, compiled = variant
    torch.manual_seed(0)
    model = build_stage1(model_config(resolution, quick), 3, resolution).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    forward = torch.compile(model) if compiled else model
    opt = precision.adam(model.parameters(), 1e-4, (0.9, 0.999), 1e-8, device)
    x = torch.rand(batch, 3, resolution, resolution, device=device).contiguous(memory_format=fmt)
    eps = torch.randn(batch, model.latent_dim, device=device)
    model.train()

    def step() -> None:
        with precision.autocast(prec, device):
            loss = forward(x, eps)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak(device)
    start = time.perf_counter()
    for _ in range(warmup):  # includes compilation and cuDNN autotuning
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    row = {"resolution": resolution, "variant": name, "batch": batch, "steps": steps,
           "img_per_s": steps * batch / elapsed, "peak_mib": peak_mib(device), "warmup_s": warm_s}
    return row


def training_table(args, device: torch.device, skipped: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    batches = {64: 4, 128: 4, 256: 2} if args.quick else {64: 128, 128: 64, 256: 32}
    steps, warmup = (1, 0) if args.quick else (20, 3)  # quick: a smoke run, not a measurement
    for res in (64, 128, 256):
        base = None
        for variant in VARIANTS:
            if variant[3] and device.type != "cuda":
                # Inductor's CPU backend builds C++ kernels for minutes on a small machine; the row
                # is a GPU question anyway.
                skipped[f"train {res}px {variant[0]}"] = "torch.compile is measured on CUDA only"
                continue
            if variant[1] == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                skipped[f"train {res}px {variant[0]}"] = "this GPU has no bf16"
                continue
            row = train_rate(res, batches[res], variant, steps, warmup, args.quick, device)
            base = base or row
            row["speed_vs_fp32"] = row["img_per_s"] / base["img_per_s"]
            row["memory_vs_fp32"] = (row["peak_mib"] / base["peak_mib"]) if row["peak_mib"] else None
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    mem = f"{row['peak_mib']:9.0f}" if row["peak_mib"] is not None else "      n/a"
    mem_ratio = f"{row['memory_vs_fp32']:6.2f}" if row["memory_vs_fp32"] is not None else "   n/a"
    print(f"| {row['resolution']:4d} | {row['variant']:16s} | {row['batch']:5d} | {row['img_per_s']:9.1f} | "
          f"{row['speed_vs_fp32']:6.2f} | {mem} | {mem_ratio} | {row['warmup_s']:7.1f} |", flush=True)


# ---------------------------------------------------------------------------------------------
# Host syncs of the project's loop


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a device value on the host (`.item()`, `bool(t)`, `float(t)`...)."""

    def __init__(self) -> None:
        super().__init__()
        self.local_scalar = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.local_scalar += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_syncs() -> Iterator[dict[str, int]]:
    """Count syncs in the block: dispatch-level scalar reads plus calls of Tensor.item and Tensor.cpu."""
    counts = {"local_scalar_dense": 0, "item": 0, "cpu": 0}
    originals = {"item": torch.Tensor.item, "cpu": torch.Tensor.cpu}

    def patched(name: str) -> Callable:
        def call(self, *a, **k):
            counts[name] += 1
            return originals[name](self, *a, **k)
        return call

    mode = SyncCounter()
    torch.Tensor.item, torch.Tensor.cpu = patched("item"), patched("cpu")
    try:
        with mode:
            yield counts
    finally:
        torch.Tensor.item, torch.Tensor.cpu = originals["item"], originals["cpu"]
        counts["local_scalar_dense"] = mode.local_scalar


class MemoryLoader:
    """A stand-in for StreamLoader over in-memory tensors (the loop needs only these members)."""

    def __init__(self, images: torch.Tensor, keys: torch.Tensor, batch: int) -> None:
        self.images, self.keys, self.batch = images, keys, batch
        self.steps_per_epoch = len(images) // batch

    def epoch(self, epoch: int, start_step: int = 0):
        for i in range(start_step, self.steps_per_epoch):
            sl = slice(i * self.batch, (i + 1) * self.batch)
            yield {"image": self.images[sl], "key": self.keys[sl]}

    def close(self) -> None:
        pass  # no worker processes


def loop_syncs(steps: int, resolution: int, batch: int, quick: bool, device: torch.device,
               info: dist.DistInfo) -> dict[str, Any]:
    """Host syncs counted over tsvae_dist.train.loop.train for `steps` and 2×`steps` steps.

    The difference over `steps` is the per-step count in steady state (without the setup, the final
    metrics line and the final checkpoint, which both runs share)."""
    cfg = model_config(resolution, quick)
    latent = cfg.latent_dim

    def run(n: int, workdir: str) -> dict[str, int]:
        torch.manual_seed(0)
        images = torch.rand(n * batch, 3, resolution, resolution)
        loader = MemoryLoader(images, torch.arange(n * batch), batch)
        tcfg = TrainConfig(batch_size=batch, epochs=1, lr=1e-4, precision="fp32", progress_bar=False,
                           checkpoint_every_steps=10**9, log_every_steps=10**9)
        job = TrainJob("stage1", build_stage1(cfg, 3, resolution), loader,
                       lambda b, _epoch: (b["image"], torch.randn(len(b["image"]), latent)),
                       RunLayout(workdir), {"bench": True})
        with counting_syncs() as counts:
            train(job, tcfg, info, StopFlag())
            sync(device)
        return counts

    with tempfile.TemporaryDirectory() as tmp:
        one, two = run(steps, f"{tmp}/a"), run(2 * steps, f"{tmp}/b")
    per_step = {k: (two[k] - one[k]) / steps for k in one}
    return {"steps": [steps, 2 * steps], "counts": [one, two], "per_step": per_step,
            "resolution": resolution, "batch": batch}


# ---------------------------------------------------------------------------------------------
# Transfers, PNG decode, checkpoint snapshot, Inception


def transfer_rates(device: torch.device, quick: bool, skipped: dict[str, str]) -> dict[str, Any]:
    """GB/s of a host-to-device copy of one 256-px float batch, pageable vs pinned (non_blocking); and
    batches/s of the training loop's path (pinned uint8, scaled on the device) vs a pageable float copy."""
    if device.type != "cuda":
        skipped["transfer"] = "pinned host-to-device copies need a GPU"
        return {"pageable_gbps": None, "pinned_gbps": None, "pinned_vs_pageable": None,
                "uint8_pinned_on_device_vs_float_pageable": None}
    batch = torch.rand(8 if quick else 64, 3, 256, 256)
    out = {}
    for name, src in (("pageable", batch), ("pinned", batch.pin_memory())):
        src.to(device, non_blocking=True)
        sync(device)
        reps = 3 if quick else 20
        start = time.perf_counter()
        for _ in range(reps):
            src.to(device, non_blocking=True)
        sync(device)
        out[f"{name}_gbps"] = reps * src.numel() * src.element_size() / (time.perf_counter() - start) / 1e9
    out["pinned_vs_pageable"] = out["pinned_gbps"] / out["pageable_gbps"]
    out["bytes"] = batch.numel() * batch.element_size()
    levels = (batch * 255).round().to(torch.uint8).pin_memory()
    rates = {}
    for name, to_device in (("float_pageable", lambda: batch.to(device, non_blocking=True)),
                            ("uint8_pinned_on_device", lambda: unit_float_on(levels, device))):
        to_device()
        sync(device)
        reps = 3 if quick else 20
        start = time.perf_counter()
        for _ in range(reps):
            to_device()
        sync(device)
        rates[name] = reps / (time.perf_counter() - start)
    out["batches_per_s"] = rates
    out["uint8_pinned_on_device_vs_float_pageable"] = rates["uint8_pinned_on_device"] / rates["float_pageable"]
    return out


def png_rates(quick: bool) -> dict[str, float]:
    """Images/s of Pillow decoding synthetic PNGs (smooth gradients + noise: compressible like photos)."""
    rng = np.random.default_rng(0)
    out = {}
    for res in (64, 128, 256):
        yy, xx = np.mgrid[0:res, 0:res]
        blobs = []
        for i in range(4 if quick else 32):
            base = np.stack([(xx * 255 // res), (yy * 255 // res), ((xx + yy + 8 * i) * 127 // res)], -1)
            img = np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        reps = 2 if quick else 10
        start = time.perf_counter()
        for _ in range(reps):
            for blob in blobs:
                np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        out[f"{res}px_img_per_s"] = reps * len(blobs) / (time.perf_counter() - start)
    return out


def to_host(obj: Any) -> Any:
    """A host copy of a (nested) state dict, as a checkpoint snapshot takes it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_host(v) for v in obj)
    return obj


def snapshot_time(quick: bool, device: torch.device) -> dict[str, Any]:
    """Seconds to copy the 256-px model's state and its Adam state to host memory."""
    torch.manual_seed(0)
    model = build_stage1(model_config(256, quick), 3, 256).to(device)
    opt = precision.adam(model.parameters(), 1e-4, (0.9, 0.999), 1e-8, device)
    x = torch.rand(2, 3, 256, 256, device=device)
    model(x, torch.randn(2, model.latent_dim, device=device))["loss"].backward()
    opt.step()  # creates exp_avg / exp_avg_sq
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    to_host(state)  # warm-up
    sync(device)
    reps = 1 if quick else 3
    start = time.perf_counter()
    for _ in range(reps):
        to_host(state)
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    return {"seconds": seconds, "mib": nbytes / 2**20, "gbps": nbytes / seconds / 1e9,
            "params": sum(p.numel() for p in model.parameters())}


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def inception_rate(quick: bool, device: torch.device) -> dict[str, Any]:
    """Images/s of FID Inception features (fp32, no TF32) on 64-px uint8-range images."""
    torch.manual_seed(0)
    net = InceptionNet().to(device).eval()
    batch = 2 if quick else 500  # quick: Inception at 299 px takes seconds per image on a small CPU
    images = torch.randint(0, 256, (batch, 3, 64, 64), device=device).float()
    if not quick:
        extract_features(net, images)  # warm-up (cuDNN autotuning)
    sync(device)
    reps = 1 if quick else 5
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(reps):
        extract_features(net, images)
    sync(device)
    return {"batch": batch, "img_per_s": reps * batch / (time.perf_counter() - start), "peak_mib": peak_mib(device)}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    p.add_argument("--quick", action="store_true", help="tiny networks, batches and step counts (CI)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device: cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible (use --device cpu for a smoke run)")
    info = dist.init(use_gpu=args.device == "cuda")
    device = info.device
    # The trainer's kernel policy (cudnn.benchmark on, TF32 as the default config says).
    precision.configure_kernels(False, TrainConfig().tf32, device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"machine: {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{', quick' if args.quick else ''}", flush=True)
    skipped: dict[str, str] = {}
    results: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "device": device.type,
                               "quick": args.quick}

    print("\n## stage-1 training (ratios against fp32 at the same resolution)")
    print("|   px | variant          | batch |     img/s | ×fp32  | peak MiB  | ×fp32  | warm s  |")
    print("|------|------------------|-------|-----------|--------|-----------|--------|---------|")
    results["training"] = training_table(args, device, skipped)

    print("\n## host syncs of tsvae_dist.train.loop.train (per step, steady state)")
    results["host_syncs"] = loop_syncs(2 if args.quick else 10, 64, 4 if args.quick else 64, args.quick,
                                       device, info)
    ps = results["host_syncs"]["per_step"]
    print(f"aten._local_scalar_dense {ps['local_scalar_dense']:.2f}, Tensor.item {ps['item']:.2f}, "
          f"Tensor.cpu {ps['cpu']:.2f}  (totals {results['host_syncs']['counts']})")

    print("\n## host-to-device batch transfer")
    results["transfer"] = tr = transfer_rates(device, args.quick, skipped)
    if tr["pinned_gbps"] is not None:
        print(f"pageable {tr['pageable_gbps']:.2f} GB/s, pinned {tr['pinned_gbps']:.2f} GB/s, "
              f"pinned/pageable {tr['pinned_vs_pageable']:.2f}")
        print(f"the loop's path (pinned uint8, scaled on the device) vs a pageable float copy: "
              f"{tr['uint8_pinned_on_device_vs_float_pageable']:.2f}x batches/s")
    else:
        print(f"skipped: {skipped['transfer']}")

    print("\n## PNG decode (Pillow, one core)")
    results["png_decode"] = png = png_rates(args.quick)
    print(", ".join(f"{k.split('_')[0]} {v:.0f} img/s" for k, v in png.items()))

    print("\n## checkpoint snapshot of the 256-px model with Adam state (device -> host)")
    results["checkpoint_snapshot"] = snap = snapshot_time(args.quick, device)
    print(f"{snap['mib']:.1f} MiB in {snap['seconds'] * 1e3:.1f} ms ({snap['gbps']:.2f} GB/s, "
          f"{snap['params'] / 1e6:.2f} M params)")

    print("\n## FID Inception, fp32, random weights")
    results["inception"] = inc = inception_rate(args.quick, device)
    print(f"batch {inc['batch']}: {inc['img_per_s']:.1f} img/s"
          + (f", peak {inc['peak_mib']:.0f} MiB" if inc["peak_mib"] is not None else ""))

    results["skipped"] = skipped
    if skipped:
        print("\nskipped:\n" + "\n".join(f"  {k}: {v}" for k, v in skipped.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
