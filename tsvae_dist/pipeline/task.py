"""The submitit callable of one stage job: a thin shell around the stage's `run(cfg)`.

On Slurm it also owns requeueing. Its stop flag replaces submitit's signal handlers (which act on
rank 0 only and ignore TERM) before anything else runs, so a signal only sets a flag, on every rank;
the stage's own flag shares it. Every stage agrees on the flag across ranks at its next boundary
(a training step, a shard, a round of evaluation units), saves its progress and raises `Preempted`.
Then, for USR1/USR2, rank 0 requeues the job while every task is still alive, and all exit without a
submitit result: the requeued job runs this same pickled task again, which resumes. TERM is never
requeued by us: it is a partition preemption (Slurm requeues the job itself) or a cancellation
(which must stay cancelled).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from tsvae_dist.errors import CheckpointError, ConfigError, DataError
from tsvae_dist.layout import stage_module
from tsvae_dist.runtime.preemption import Preempted, StopFlag, ignore_stop_signals
from tsvae_dist.storage import StorageError

log = logging.getLogger(__name__)



class RequeueFailed(RuntimeError):
    """A stopped stage could not put its job back in the queue (the job then fails, naming why)."""


class StageTask:
    """Runs one pipeline stage on every task of a submitit job (local or Slurm)."""

    def __init__(self, stage: str, config: dict[str, Any]):
        self.stage = stage  # one of layout.STAGES
        self.config = config  # the resolved RunConfig as plain data (pickles without our classes)

    def __call__(self) -> str:
        stop = StopFlag().install()  # first of all: from here on a signal only sets the flag

        import submitit
        import torch

        from tsvae_dist.config import from_container, stage_cluster
        from tsvae_dist.runtime.log import setup_logging

        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for torch.distributed and loader workers; the job's
        # own values win over any the user's shell exported (without overwrite submitit would refuse).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = from_container(self.config)
        threads = max(1, cfg.cluster.cpus_per_task)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        setup_logging()
        rank = int(os.environ.get("RANK", "0"))
        max_requeues = stage_cluster(cfg.cluster, self.stage).max_requeues
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        if on_slurm:
            log.info("%s: Slurm job %s, attempt %d", self.stage, os.environ.get("SLURM_JOB_ID"),
                     1 + int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        try:
            result = importlib.import_module(stage_module(self.stage)).run(cfg)
        except Preempted as e:
            if not on_slurm:
                raise
            _requeue_and_exit(e, stop, rank, max_requeues)
            raise  # unreachable: _requeue_and_exit exits or raises
        except (ConfigError, DataError, CheckpointError, StorageError) as e:
            # Our errors name their culprit: one plain line in the task's log above submitit's traceback.
            log.error("error: %s: rank %d: %s", self.stage, rank, e)
            raise
        # Done: a late notice (a time limit near) must not kill the exiting process, which would fail
        # the finished job and cancel its dependents. Python resets its own handlers as it exits; an
        # ignored signal stays ignored.
        ignore_stop_signals()
        return result

    def checkpoint(self) -> Any:
        """submitit's own USR2 handler, live only during start-up (until `__call__` installs ours):
        requeue this same task; a stage resumes from its artifacts whenever it starts."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(StageTask(self.stage, self.config))

    def __repr__(self) -> str:
        return f"StageTask({self.stage})"


def _requeue_and_exit(stopped: Preempted, stop: StopFlag, rank: int, max_requeues: int) -> None:
    """After a committed checkpoint: requeue (rank 0, all tasks alive), then exit every task."""
    from tsvae_dist.pipeline.slurm import requeue_current_job
    from tsvae_dist.runtime import dist

    if "SIGTERM" in stop.signals:
        why_not = None
        if rank == 0:
            log.warning("%s; SIGTERM: the requeue (partition preemption) is Slurm's", stopped)
    else:
        why_not = requeue_current_job(max_requeues) if rank == 0 else None
        if rank == 0 and why_not is None:
            log.warning("%s; checkpoint committed, job %s requeued", stopped, os.environ.get("SLURM_JOB_ID"))
    # A collective: no task exits before rank 0's requeue is registered, and all agree on the outcome.
    why_not = dist.broadcast_object(why_not)
    dist.shutdown()
    if why_not is not None:
        raise RequeueFailed(f"{stopped}; not requeued: {why_not}") from stopped
    # SystemExit bypasses submitit's result file: the job is not over, its next attempt will write it.
    ignore_stop_signals()  # Slurm's TERM to the requeued job's processes: exit cleanly, not by signal
    sys.exit(0)

