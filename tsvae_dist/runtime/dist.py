"""Distributed setup for every launcher: a plain process, torchrun, submitit or Slurm's srun.

`init()` reads the environment once and returns a `DistInfo`; everything else asks it. A
half-set environment (RANK without WORLD_SIZE, say) is an error, not a silent single process.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from tsvae_dist.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this node (selects the GPU)
    device: torch.device  # cuda:<local_rank> when GPUs are used, else cpu

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    """The integer in variable `name`, None if unset or empty; ConfigError naming it if not an integer."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment: {name}={value!r} is not an integer") from None


def _check_ranks(rank: int, world: int, local: int, names: tuple[str, str, str]) -> None:
    """0 <= rank < world, world >= 1 and local >= 0, else a ConfigError naming the variables (`names`)."""
    rank_name, world_name, local_name = names
    if world < 1:
        raise ConfigError(f"environment: {world_name}={world}; expected at least 1")
    if not 0 <= rank < world:
        raise ConfigError(f"environment: {rank_name}={rank} outside [0, {world_name}={world})")
    if local < 0:
        raise ConfigError(f"environment: {local_name}={local}; expected at least 0")


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _read_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/submitit variables, else Slurm's, else (0, 1, 0)."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is not None or world is not None:
        if rank is None or world is None:
            raise ConfigError("environment: RANK and WORLD_SIZE must be set together (torchrun-style launch)")
        local = local if local is not None else 0
        _check_ranks(rank, world, local, ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise ConfigError("environment: WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT")
        return rank, world, local
    rank = _env_int("SLURM_PROCID")
    if rank is not None:  # SLURM_NTASKS alone (a batch script outside srun) is no task: a plain process
        # srun without submitit: derive the rendezvous from Slurm's variables, the same on every task.
        world = _env_int("SLURM_NTASKS")
        if world is None and rank == 0:  # a batch script without --ntasks: Slurm sets PROCID=0 alone
            return 0, 1, 0
        if world is None:
            raise ConfigError("environment: SLURM_PROCID is set without SLURM_NTASKS (half-set Slurm task)")
        local = _env_int("SLURM_LOCALID") or 0
        _check_ranks(rank, world, local, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        if world > 1:
            # Not setdefault: its default would run scontrol (maybe absent) even with MASTER_ADDR given.
            if not os.environ.get("MASTER_ADDR"):
                os.environ["MASTER_ADDR"] = _slurm_master_addr()
            if not os.environ.get("MASTER_PORT"):
                os.environ["MASTER_PORT"] = str(20000 + (_env_int("SLURM_JOB_ID") or 0) % 20000)
        # Exported for data loader workers and webdataset, which read them before torch.distributed, and
        # so that reading the environment again (init is idempotent; child processes) takes the torchrun
        # branch with the same answer: LOCAL_RANK too, or it would read as 0.
        os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world), str(local)
        return rank, world, local
    return 0, 1, 0


def init(use_gpu: bool | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group (NCCL on GPU, gloo on CPU) once; idempotent."""
    rank, world, local = _read_environment()
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    # submitit may narrow CUDA_VISIBLE_DEVICES to this task's GPU, which is then device 0.
    device = torch.device("cuda", local % torch.cuda.device_count()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (one all-reduce): ranks agree on stopping."""
    if not torch_dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (and return it); a no-op in a single process."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s object on every rank (small objects only: decisions, names)."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` stacked in rank order (world, *shape); (1, *shape) in a single process."""
    if not torch_dist.is_initialized():
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)
