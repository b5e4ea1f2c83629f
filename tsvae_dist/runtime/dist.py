"""Distributed setup for every launcher: a plain process, torchrun, submitit or Slurm's srun.

`init()` reads the environment once and returns a `DistInfo`; everything else asks it. A
half-set environment (RANK without WORLD_SIZE, say) is an error, not a silent single process.

Failures are fast: the process group starts with a generous timeout (the first step compiles,
warms up and starts the data pipeline on every rank at its own pace), and the training loop
shortens it with `shorten_timeout` once its first step is done, so a rank left waiting in a
collective for a dead or stuck peer fails within `cluster.collective_timeout_s` instead of half an
hour. On CUDA, NCCL's asynchronous error handling is switched on so such a timeout aborts the
collective (and the process) instead of blocking forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from tsvae_dist.errors import ConfigError
from tsvae_dist.runtime import RENDEZVOUS_FILE_VAR

log = logging.getLogger(__name__)

# NCCL watchdog: abort a timed-out or failed collective and end the process (torch >= 2.2 reads the
# first name, older releases the second). Set only where the user has not chosen otherwise.
NCCL_ASYNC_ERROR_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this node (selects the GPU)
    device: torch.device  # cuda:<local_rank> when GPUs are used, else cpu
    collective_timeout_s: float = 0.0  # the timeout `shorten_timeout` sets after the first step (0: keep)

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


def enable_nccl_async_errors(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Switch on NCCL's asynchronous error handling unless the environment already says (before init)."""
    for name in NCCL_ASYNC_ERROR_VARS:
        environ.setdefault(name, "1")


def init(use_gpu: bool | None = None, timeout_s: float = 1800, collective_timeout_s: float = 0.0) -> DistInfo:
    """Initialise the process group (NCCL on GPU, gloo on CPU) once; idempotent.

    `timeout_s` bounds every collective until `shorten_timeout` replaces it by `collective_timeout_s`.
    """
    rank, world, local = _read_environment()
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    # submitit may narrow CUDA_VISIBLE_DEVICES to this task's GPU, which is then device 0.
    device = torch.device("cuda", local % torch.cuda.device_count()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
        enable_nccl_async_errors()
    if world > 1 and not torch_dist.is_initialized():
        rendezvous = os.environ.get(RENDEZVOUS_FILE_VAR)
        torch_dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            init_method=f"file://{rendezvous}" if rendezvous else None,  # None: env:// (MASTER_ADDR/PORT)
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device,
                    collective_timeout_s=collective_timeout_s)


def shorten_timeout(info: DistInfo) -> str | None:
    """Set the default group's collective timeout to `info.collective_timeout_s`; returns None when done,
    else why not (single process, no timeout configured, or a torch without `_set_pg_timeout`)."""
    if not torch_dist.is_initialized():
        return "no process group"
    if info.collective_timeout_s <= 0:
        return "cluster.collective_timeout_s is 0 (keep the start-up timeout)"
    # A private torch function (2.3+, gloo and NCCL); without it the start-up timeout stays in force.
    set_timeout = getattr(torch_dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:
        why = f"torch {torch.__version__} cannot change a process group's timeout (no _set_pg_timeout)"
        log.warning("collective timeout not shortened: %s", why)
        return why
    set_timeout(datetime.timedelta(seconds=info.collective_timeout_s))
    return None


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
