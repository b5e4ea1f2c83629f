"""The submitit callable of one stage job: a 20-line shell around the stage's `run(cfg)`."""

from __future__ import annotations

import importlib
import os
from typing import Any

STAGE_MODULES = {
    "stage1": "tsvae_dist.stage1",
    "encode": "tsvae_dist.encode",
    "stage2": "tsvae_dist.stage2",
    "evaluate": "tsvae_dist.evaluate",
}


class StageTask:
    """Runs one pipeline stage on every task of a submitit job (local or Slurm)."""

    def __init__(self, stage: str, config: dict[str, Any]):
        self.stage = stage  # a key of STAGE_MODULES
        self.config = config  # the resolved RunConfig as plain data (pickles without our classes)

    def __call__(self) -> str:
        import submitit
        import torch

        from tsvae_dist.cli import setup_logging
        from tsvae_dist.config import from_container

        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for torch.distributed and loader workers.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = from_container(self.config)
        threads = max(1, cfg.cluster.cpus_per_task)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        setup_logging()
        return importlib.import_module(STAGE_MODULES[self.stage]).run(cfg)

    def __repr__(self) -> str:
        return f"StageTask({self.stage})"
