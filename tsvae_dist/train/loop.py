"""The distributed training loop shared by stage 1 and stage 2.

A stage hands over a model whose forward returns its loss terms, a deterministic loader and a
function that turns a batch into model inputs; `train` does the rest: data parallelism with a
gradient sum in one fixed order that overlaps the backward pass (`replicas.py`: a resume is bit-exact
on any world size), mixed precision, the paper's Adam step schedule, checkpoints with exact resume,
preemption, metrics.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tsvae_dist.config import TrainConfig
from tsvae_dist.data.loader import StreamLoader
from tsvae_dist.data.workers import unit_float_on
from tsvae_dist.layout import RunLayout
from tsvae_dist.models.sync_bn import convert_sync_batchnorm
from tsvae_dist.runtime import dist
from tsvae_dist.runtime.preemption import Preempted, StopFlag
from tsvae_dist.train import precision
from tsvae_dist.train.checkpoint import CheckpointStore, check_resumable, resolved
from tsvae_dist.train.metrics import MetricsLog, MetricsWindow
from tsvae_dist.train.replicas import Replicas

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """What a training stage plugs into the shared loop."""

    name: str  # "stage1" or "stage2": names metrics and checkpoints
    model: nn.Module  # forward(*inputs) -> dict of scalar tensors with "loss"
    loader: StreamLoader  # deterministic batches per (epoch, step)
    inputs: Callable[[dict[str, Any], int], tuple[torch.Tensor, ...]]  # (batch, epoch) -> forward args
    layout: RunLayout  # the run's paths: the stage's checkpoints/, metrics.jsonl, tb/
    resume_config: dict[str, Any]  # config keys that change results; a resume under others is refused


@dataclass
class TrainResult:
    model: nn.Module  # the trained module
    samples_seen: int  # training samples consumed in total
    steps: int  # optimizer steps taken in total
    last_metrics: dict[str, float]  # the last logged metrics line
    skipped_samples: int = 0  # bad samples all ranks skipped in this attempt (loader.max_skipped_samples)


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A model input on `device`: uint8 tensors are images, sent as bytes and scaled to [0, 1] there."""
    if tensor.dtype == torch.uint8:
        return unit_float_on(tensor, device)
    return tensor.to(device, non_blocking=True)


def batch_gpu(cfg: TrainConfig, world_size: int) -> int:
    """Samples per forward pass on each rank: `cfg.batch_gpu`, or the whole per-rank share of the batch."""
    return cfg.batch_gpu or cfg.batch_size // world_size


def accumulation_rounds(cfg: TrainConfig, world_size: int) -> int:
    """Forward/backward rounds per optimizer step (EDM2's num_accumulation_rounds); validated to divide."""
    return cfg.batch_size // (batch_gpu(cfg, world_size) * world_size)


def use_sync_bn(cfg: TrainConfig, world_size: int) -> bool:
    """SyncBN makes BatchNorm see the global batch; on by default when the batch one forward pass
    sees on a rank (`batch_gpu`) is small."""
    if cfg.sync_bn != "auto":
        return cfg.sync_bn == "on"
    return world_size > 1 and batch_gpu(cfg, world_size) < 64


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Adam's parameter groups: one, or with `gamma_lr` set a second holding the learned `log_gamma` alone.

    Each group's `lr_scale` multiplies the schedule's learning rate, so log γ's rate halves with the rest.
    """
    named = list(model.named_parameters())
    if cfg.gamma_lr <= 0 or not any(name == "log_gamma" for name, _ in named):
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    return [{"params": [p for name, p in named if name != "log_gamma"], "lr_scale": 1.0},
            {"params": [p for name, p in named if name == "log_gamma"], "lr_scale": cfg.gamma_lr / cfg.lr,
             "name": "log_gamma"}]


def learning_rate(cfg: TrainConfig, epoch: int, step: int = 0) -> float:
    """The paper's step schedule (halve every `lr_halve_every_epochs` epochs), times the batch-size
    scaling rule, times a linear warmup over the first `warmup_steps` optimizer steps (`step` from 0)."""
    ratio = cfg.batch_size / cfg.lr_reference_batch
    scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    return cfg.lr * scale * warmup * 0.5 ** (epoch // cfg.lr_halve_every_epochs)


def accumulate(model: nn.Module, inputs: list[torch.Tensor], rounds: int, amp: str, device: torch.device,
               scaler: torch.amp.GradScaler, before_last_backward: Callable[[], None] = lambda: None,
               ) -> dict[str, torch.Tensor]:
    """Gradient accumulation: forward/backward over `rounds` equal slices of the rank's batch, each loss
    weighted 1/rounds, so the gradient is the mean-loss one of the whole batch. The loss terms returned
    are the rounds' means (detached), as one pass over the batch would report them."""
    total: dict[str, torch.Tensor] = {}
    for i, part in enumerate(zip(*(t.chunk(rounds) for t in inputs), strict=True)):
        with precision.autocast(amp, device):
            terms = model(*part)
        if i == rounds - 1:
            before_last_backward()  # e.g. start sending gradient buckets as they are final
        scaler.scale(terms["loss"] / rounds).backward()
        for k, v in terms.items():
            total[k] = total.get(k, 0) + v.detach() / rounds
    return total


def train(job: TrainJob, cfg: TrainConfig, info: dist.DistInfo, stop: StopFlag | None = None) -> TrainResult:
    """Train `job.model` for `cfg.epochs` epochs, resuming from the stage's latest checkpoint."""
    loader, steps_per_epoch = job.loader, job.loader.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop = stop or StopFlag().install()

    # Set up the kernels, the model, its replicas on the other ranks and the optimizer.
    precision.configure_kernels(cfg.deterministic, cfg.tf32, info.device)
    model = job.model.to(info.device)  # before converting BN: on CUDA that picks torch's fused SyncBatchNorm
    # Kernel settings resolved for this device ("auto"); the checkpoint records these, not "auto".
    amp = precision.resolve(cfg.precision, info.device)
    memory_format = precision.resolve_memory_format(cfg.memory_format, model, info.device)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    run_config = resolved(job.resume_config, job.name, precision=amp, memory_format=memory_format)
    sync_bn = info.distributed and use_sync_bn(cfg, info.world_size)
    if sync_bn:
        model = convert_sync_batchnorm(model)
    replicas = Replicas(model, average_buffers=not sync_bn)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = precision.adam(param_groups(model, cfg), cfg.lr, betas, cfg.adam_eps, info.device)
    scaler = precision.grad_scaler(amp, info.device)
    rounds = accumulation_rounds(cfg, info.world_size)
    if cfg.compile:  # after SyncBN and replicas: they see the plain modules; compile wraps the forward only
        precision.compile_forward(model)
    store = CheckpointStore(job.layout.checkpoints(job.name), keep=cfg.keep_checkpoints)

    # Load the previous checkpoint, if any, and decide where to start.
    step = 0
    state = store.load_latest()
    if state is not None:
        check_resumable(state["config"], run_config, state["url"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if info.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], info.device)
        if info.is_main:
            log.info("%s: resuming from %s at step %d/%d", job.name, state["url"], step, total_steps)
    metrics_log = MetricsLog(job.layout.metrics(job.name), job.layout.tensorboard(job.name), step,
                             enabled=info.is_main)
    window = MetricsWindow()  # the loss terms since the last metrics line, on the device
    if state is not None:
        window.load(state.get("window"), info.rank, info.device)

    # Checkpoints: rank 0 copies the state to host memory and writes it in the background while
    # training goes on (CheckpointStore.save_async); only a stop and the end wait for the commit.
    # The starting step needs no checkpoint: it is the loaded one, or the seed's initialisation.
    saved_step, last_save = step, time.monotonic()

    def save(commit: bool = False) -> None:
        nonlocal saved_step, last_save
        if saved_step != step:  # a stop right after a periodic save: that one is the checkpoint
            window_state = window.state()  # a collective: before the rank-0 branch
            if info.is_main:
                store.save_async(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "samples_seen": step * cfg.batch_size,
                        "epoch": step // steps_per_epoch,
                        "step_in_epoch": step % steps_per_epoch,
                        "config": run_config,
                        "world_size": info.world_size,
                        "window": window_state,
                        # Nothing in the loop draws from the global generators (noise is keyed by sample),
                        # but whatever a model might draw resumes where it stopped.
                        "rng": {"cpu": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state(info.device) if info.device.type == "cuda" else None},
                    },
                    step * cfg.batch_size,
                )
                metrics_log.flush()
            saved_step, last_save = step, time.monotonic()
        if commit:
            if info.is_main:
                store.wait()
            dist.barrier()  # nobody goes on (exits, or reads the stage's output) before the commit

    def agree(stop_flag: bool) -> tuple[bool, bool]:
        """(stop, timed save due) on every rank: one all-reduce and one host read for both flags."""
        minutes = (time.monotonic() - last_save) / 60
        timer = cfg.checkpoint_every_min > 0 and minutes >= cfg.checkpoint_every_min
        due = info.is_main and timer and step != saved_step
        flags = dist.all_reduce_sum(torch.tensor([int(stop_flag), int(due)], dtype=torch.int32, device=info.device))
        stop_any, due_any = (v > 0 for v in flags.tolist())
        return stop_any, due_any

    bar = None
    if info.is_main and cfg.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=total_steps * cfg.batch_size, initial=step * cfg.batch_size, unit="img",
                   desc=job.name, unit_scale=True, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)  # batch logs: a line every 30 s

    # Train: the loop runs over (epoch, step-in-epoch) so a resume lands on the exact batch.
    model.train()
    window_start = time.perf_counter()
    last_metrics: dict[str, float] = {}
    first_step = step
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            for batch in loader.epoch(epoch, start_step=step % steps_per_epoch):
                lr = learning_rate(cfg, epoch, step)  # per step: warmup changes it within an epoch
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                # Agree on stopping before the step, so every rank stops at the same one; only every
                # `stop_check_every_steps` steps, since the agreement is a host sync that stalls the device.
                if step % cfg.stop_check_every_steps == 0:
                    stopping, save_due = agree(stop.is_set())
                    if stopping:
                        save(commit=True)
                        raise Preempted(f"{job.name}: stopped by {stop.signal_name or 'request'} at step {step}")
                    if save_due:
                        save()

                # One optimizer step.
                inputs = [precision.to_memory_format(on_device(t, info.device), memory_format)
                          for t in job.inputs(batch, epoch)]
                optimizer.zero_grad(set_to_none=True)
                if rounds == 1:
                    with precision.autocast(amp, info.device):
                        terms = model(*inputs)
                    replicas.expect_backward()  # gradient buckets go on the wire while backward runs
                    scaler.scale(terms["loss"]).backward()
                else:
                    terms = accumulate(model, inputs, rounds, amp, info.device, scaler, replicas.expect_backward)
                replicas.sync()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                if step == first_step + 1:  # warm-up is over: a peer that stops answering now has failed
                    dist.shorten_timeout(info)

                # Metrics: averaged over the window's steps and over ranks.
                window.add(terms)
                if bar is not None:
                    bar.update(cfg.batch_size)
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    elapsed, window_steps = time.perf_counter() - window_start, window.steps
                    last_metrics = window.read(info.world_size)
                    last_metrics.update(
                        lr=lr, epoch=epoch, samples=step * cfg.batch_size,
                        samples_per_s=window_steps * cfg.batch_size / max(elapsed, 1e-9),
                    )
                    metrics_log.write(step, last_metrics)
                    if not math.isfinite(last_metrics["loss"]):
                        raise FloatingPointError(f"{job.name}: loss is {last_metrics['loss']} near step {step}")
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_metrics['loss']:.4g}", gamma=f"{last_metrics.get('gamma', 0):.3g}")
                    window_start = time.perf_counter()

                # Checkpoint.
                if step % cfg.checkpoint_every_steps == 0 or step == total_steps:
                    save(commit=step == total_steps)
    finally:
        job.loader.close()  # its worker processes: now, not when the garbage collector gets to them
        replicas.close()
    if bar is not None:
        bar.close()
    metrics_log.close()
    skipped = int(dist.all_reduce_sum(torch.tensor(float(getattr(loader, "skipped_samples", 0)))).item())
    return TrainResult(model=model, samples_seen=step * cfg.batch_size, steps=step, last_metrics=last_metrics,
                       skipped_samples=skipped)
