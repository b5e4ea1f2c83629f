"""Synchronised BatchNorm for every backend: torch's on CUDA, our own on CPU (gloo).

With DDP each rank sees batch / world samples; the paper's BatchNorm statistics are over the whole
batch, so they must be reduced across ranks. torch's nn.SyncBatchNorm raises on CPU tensors (and
DDP refuses it in a CPU module), hence `DistributedBatchNorm` for CPU training and the parity tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of the ranks'
    gradients. Our own because torch.distributed.nn.functional.all_reduce is deprecated and warns
    on every call."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `tensor` over the ranks of `group` (default: all), with gradients."""
    return _AllReduceSum.apply(tensor, group)


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm over the batch of every rank, for inputs (N, C) or (N, C, *) on any device.

    In training, with a process group of more than one rank, per-channel statistics come from two
    differentiable all-reduces in float32: [Σx, count], then Σ(x − mean)². Two passes rather than
    Σx and Σx² in one, because E[x²] − E[x]² cancels catastrophically in fp32 when |mean| ≫ std.
    Running stats update as BatchNorm's (unbiased variance). Otherwise (eval mode, one process) it
    is plain batch norm. Parameters and buffers are BatchNorm's, so state_dicts are interchangeable
    with nn.BatchNorm*d. Not a subclass of nn.SyncBatchNorm on purpose: DDP refuses those on CPU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C) or (N, C, ...); got {tuple(input.shape)}")

    def _synchronise(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._synchronise():
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        reduce_dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float()

        local = torch.cat([x.sum(reduce_dims), x.new_tensor([x.numel() / channels])])
        total = all_reduce_sum(local, self.process_group)
        count = total[-1].detach()
        # Checked from the shapes, not `count`: reading a device value each step is a host sync. Every
        # rank holds the same batch size (the loader's contract), so the global count is local × world.
        if x.numel() // channels * dist.get_world_size(self.process_group) <= 1:
            raise ValueError(
                f"expected more than 1 value per channel over all ranks; got {tuple(input.shape)}"
            )
        mean = total[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.square().sum(reduce_dims), self.process_group) / count

        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.float().view(shape)
        if self.bias is not None:
            out = out + self.bias.float().view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None means a cumulative average, as in nn.BatchNorm.
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm in `module` by a synchronised one; returns the converted module.

    A module already on CUDA gets torch's nn.SyncBatchNorm (fused kernels); otherwise the layers
    become `DistributedBatchNorm`, which is correct on any device (so converting before `.to(cuda)`
    still works, only without torch's kernels: convert after moving). Parameters and buffers stay
    the same objects, and state_dict keys are unchanged.
    """
    if any(t.is_cuda for t in [*module.parameters(), *module.buffers()]):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (DistributedBatchNorm, nn.SyncBatchNorm)):
        out = DistributedBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device=_device_of(module),
        )
        out.weight = module.weight  # the same Parameters and buffers, as torch's converter does
        out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group))
    return out


def _device_of(module: nn.Module) -> torch.device | None:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return tensors[0].device if tensors else None
