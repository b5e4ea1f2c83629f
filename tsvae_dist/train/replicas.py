"""Data-parallel replicas whose gradient sum never changes order: our own all-reduce, not DDP's.

DDP reduces the first backward of a fresh process with its initial bucket layout and rebuilds the
buckets after it; gloo's ring all-reduce (and NCCL's) sums each element in an order set by its
position in the buffer, so every restart summed one step's gradients in another order than the
uninterrupted run did: resumes were bit-exact with 2 ranks only (a + b = b + a). Here the buckets
are planned once from the parameters' order and sizes alone and never rebuilt: every step reduces
the same fp32 buffers, each with one all-reduce, divided by the world size. For a fixed world size
and backend the result is a function of the ranks' gradients alone, the same in a fresh process
and in one that has run for days.

Communication overlaps the backward pass, as DDP's does: a bucket (parameters in reverse order, the
order backward produces their gradients; a small first bucket so that the wire starts early) is
sent as soon as all its gradients have arrived, and buckets are always sent in index order, so every
rank issues the same collectives in the same order whatever its autograd thread did. A bucket whose
gradients did not all arrive (a parameter this backward did not use) is sent by `sync()`, where such
a parameter counts as a zero gradient.

Buffers: with synchronised BatchNorm every rank computes the same running statistics (they come
from all-reduced sums, identical on every rank), so they need nothing. Without it each rank's
running statistics see only its own batch; they are averaged over ranks by one more all-reduce in
`sync()`, so every rank holds (and a checkpoint saves) the same statistics of the global batch's moments.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as torch_dist
from torch import nn

# Bucket capacities in bytes of fp32 gradient, as DDP's defaults: the first bucket small so that the
# first all-reduce starts while most of the backward is still to run, the others large enough that
# per-collective latency is a small share.
FIRST_BUCKET_BYTES = 1 << 20
BUCKET_BYTES = 25 << 20


def plan_buckets(sizes: list[int], first_bytes: int = FIRST_BUCKET_BYTES,
                 bytes_per_bucket: int = BUCKET_BYTES) -> list[list[int]]:
    """Parameter indices per bucket, from the parameters' element counts alone: the last parameter
    first (backward produces the output layers' gradients first), a bucket closed once it holds
    its capacity. A function of `sizes` only, so every process plans the same buckets."""
    buckets: list[list[int]] = [[]]
    filled, capacity = 0, first_bytes
    for index in reversed(range(len(sizes))):
        if buckets[-1] and filled + 4 * sizes[index] > capacity:
            buckets.append([])
            filled, capacity = 0, bytes_per_bucket
        buckets[-1].append(index)
        filled += 4 * sizes[index]
    return [b for b in buckets if b]


class _Bucket:
    """Some parameters' gradients in one flat fp32 buffer, and its all-reduce once sent."""

    def __init__(self, params: list[nn.Parameter], device: torch.device) -> None:
        self.params = params
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        self.parts = self.flat.split([p.numel() for p in params])
        self.waiting = len(params)  # gradients still to arrive in this backward
        self.work: torch_dist.Work | None = None

    def send(self) -> None:
        for p, part in zip(self.params, self.parts, strict=True):
            if p.grad is None:
                part.zero_()
            else:
                part.copy_(p.grad.reshape(-1))
        self.work = torch_dist.all_reduce(self.flat, op=torch_dist.ReduceOp.SUM, async_op=True)

    def receive(self, world: int) -> None:
        self.work.wait()
        self.flat.div_(world)
        for p, part in zip(self.params, self.parts, strict=True):
            if p.grad is None:
                p.grad = part.view_as(p).to(p.dtype, copy=True)
            else:
                p.grad.copy_(part.view_as(p.grad))
        self.waiting, self.work = len(self.params), None


class Replicas:
    """Keeps the copies of `model` on all ranks identical.

    Per optimizer step: `expect_backward()` before the step's last (or only) backward, whose
    gradients are then sent while it runs; `sync()` after it, which returns once every rank holds
    the averaged gradients (and buffers)."""

    def __init__(self, model: nn.Module, average_buffers: bool,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()] if average_buffers else []
        self.world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        self._broadcast_from_rank0(model)
        self._buckets: list[_Bucket] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._next = 0  # the next bucket to send: strictly in index order, the same on every rank
        self._armed = False  # whether gradients arriving now are the step's final ones
        if self.world == 1:
            return
        device = self.params[0].device if self.params else torch.device("cpu")
        plan = plan_buckets([p.numel() for p in self.params], first_bucket_bytes, bucket_bytes)
        self._buckets = [_Bucket([self.params[i] for i in indices], device) for indices in plan]
        for b, indices in enumerate(plan):
            for i in indices:
                hook = functools.partial(self._arrived, b)
                self._hooks.append(self.params[i].register_post_accumulate_grad_hook(hook))
        self._buffer_flat = torch.empty(sum(b.numel() for b in self.buffers), dtype=torch.float32, device=device)

    def _broadcast_from_rank0(self, model: nn.Module) -> None:
        """Start from rank 0's weights and buffers (every rank seeds alike; this makes sure of it)."""
        if self.world == 1:
            return
        tensors = [*model.parameters(), *model.buffers()]
        for dtype in sorted({t.dtype for t in tensors}, key=str):  # one broadcast per dtype
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            torch_dist.broadcast(flat, src=0)
            with torch.no_grad():
                for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                    t.copy_(part.view_as(t))

    def close(self) -> None:
        """Remove the gradient hooks: the model can go on to another loop (or none)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def expect_backward(self) -> None:
        """The next backward is the step's last: send each bucket as soon as its gradients are in."""
        self._armed = self.world > 1

    @torch.no_grad()
    def _arrived(self, bucket: int, _param: torch.Tensor) -> None:
        if not self._armed:
            return  # an accumulation round before the last: its gradients are not final yet
        self._buckets[bucket].waiting -= 1
        self._send_ready()

    def _send_ready(self) -> None:
        while self._next < len(self._buckets) and self._buckets[self._next].waiting == 0:
            self._buckets[self._next].send()
            self._next += 1

    @torch.no_grad()
    def sync(self) -> None:
        """Average the gradients (and, without SyncBN, the floating buffers) over ranks, in one fixed order.

        A parameter without a gradient on this rank counts as a zero gradient, so ranks agree on
        every parameter's update whatever each one's forward used.
        """
        if self.world == 1:
            return
        self._armed = False
        while self._next < len(self._buckets):  # buckets still waiting for a gradient (or not armed)
            self._buckets[self._next].send()
            self._next += 1
        if self.buffers:
            parts = self._buffer_flat.split([b.numel() for b in self.buffers])
            for b, part in zip(self.buffers, parts, strict=True):
                part.copy_(b.reshape(-1))
            buffers_sent = torch_dist.all_reduce(self._buffer_flat, op=torch_dist.ReduceOp.SUM, async_op=True)
        for bucket in self._buckets:
            bucket.receive(self.world)
        self._next = 0
        if self.buffers:
            buffers_sent.wait()
            self._buffer_flat.div_(self.world)
            for b, part in zip(self.buffers, parts, strict=True):
                b.copy_(part.view_as(b))
