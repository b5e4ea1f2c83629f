"""Data-parallel replicas whose gradient sum never changes order: our own all-reduce, not DDP's.

DDP reduces the first backward of a fresh process with its initial bucket layout and rebuilds the
buckets after it; gloo's ring all-reduce (and NCCL's) sums each element in an order set by its
position in the buffer, so every restart summed one step's gradients in another order than the
uninterrupted run did: resumes were bit-exact with 2 ranks only (a + b = b + a). Here every step
reduces the same buffer: all gradients flattened into one fp32 vector in parameter order, summed
with one all-reduce, divided by the world size. For a fixed world size and backend the result is a
function of the ranks' gradients alone, the same in a fresh process and in one that has run for
days. The price is no overlap of communication with backward (DDP's buckets overlap it); on CPU
and for the paper's model sizes that is a small share of a step (benchmarks/RESULTS.md).

Buffers: with synchronised BatchNorm every rank computes the same running statistics (they come
from all-reduced sums, identical on every rank), so they need nothing. Without it each rank's
running statistics see only its own batch; they are averaged over ranks in the same all-reduce,
so every rank holds (and a checkpoint saves) the same statistics of the global batch's moments.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn


class Replicas:
    """Keeps the copies of `model` on all ranks identical: call `sync()` after each backward."""

    def __init__(self, model: nn.Module, average_buffers: bool):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()] if average_buffers else []
        self.world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        device = self.params[0].device if self.params else torch.device("cpu")
        self._sizes = [p.numel() for p in self.params] + [b.numel() for b in self.buffers]
        self._flat = torch.empty(sum(self._sizes), dtype=torch.float32, device=device)
        self._broadcast_from_rank0(model)

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

    @torch.no_grad()
    def sync(self) -> None:
        """Average the gradients (and, without SyncBN, the floating buffers) over ranks, in one fixed order.

        A parameter without a gradient on this rank counts as a zero gradient, so ranks agree on
        every parameter's update whatever each one's forward used.
        """
        if self.world == 1:
            return
        parts = self._flat.split(self._sizes)
        for p, part in zip(self.params, parts, strict=False):
            if p.grad is None:
                part.zero_()
            else:
                part.copy_(p.grad.reshape(-1))
        for b, part in zip(self.buffers, parts[len(self.params):], strict=True):
            part.copy_(b.reshape(-1))
        torch_dist.all_reduce(self._flat, op=torch_dist.ReduceOp.SUM)
        self._flat.div_(self.world)
        for p, part in zip(self.params, parts, strict=False):
            if p.grad is None:
                p.grad = part.view_as(p).to(p.dtype, copy=True)
            else:
                p.grad.copy_(part.view_as(p.grad))
        for b, part in zip(self.buffers, parts[len(self.params):], strict=True):
            b.copy_(part.view_as(b))
