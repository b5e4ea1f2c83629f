"""`python -m tests.syncs <out.json> [overrides]` (under torchrun): stage 1 with every host sync counted.

A host sync is a read of a tensor's value by the host: `aten._local_scalar_dense` (`.item()`, `bool(t)`,
`float(t)`) and `Tensor.cpu`/`.item`/`.tolist`, counted while `train` runs. Adam's own reads of its
step counter are not counted: that counter lives on the host (torch keeps it on the CPU unless the
optimizer is fused or capturable, and the fused CUDA Adam reads nothing), so it never waits on a device.
Each rank writes its counts to <out.json>.<rank>.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tsvae_dist.cli import main
from tsvae_dist.stages import stage1


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.sites: dict[str, int] = {}
        self.paused = 0  # > 0 inside Adam.step or a patched method (counted once, by the method)

    def count(self, what: str) -> None:
        if not self.paused:
            self.counts[what] = self.counts.get(what, 0) + 1
            where = next((f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(traceback.extract_stack())
                          if "tsvae_dist" in f.filename), "?")
            self.sites[where] = self.sites.get(where, 0) + 1  # for the failure message: which line synced

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


def _patched(counter: SyncCounter, owner: type, name: str) -> None:
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        counter.count(f"{owner.__name__}.{name}")
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    setattr(owner, name, wrapper)


def _uncounted(counter: SyncCounter, owner: type, name: str) -> None:
    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    setattr(owner, name, wrapper)


def counted_train(out: str):
    train = stage1.train

    def run(job, cfg, info, *args, **kwargs):
        counter = SyncCounter()
        for name in ("cpu", "item", "tolist"):
            _patched(counter, torch.Tensor, name)
        _uncounted(counter, torch.optim.Adam, "step")
        with counter:
            result = train(job, cfg, info, *args, **kwargs)
        with open(f"{out}.{info.rank}", "w") as f:
            json.dump({"counts": counter.counts, "sites": counter.sites, "steps": result.steps}, f)
        return result

    return run


if __name__ == "__main__":
    out = sys.argv.pop(1)
    stage1.train = counted_train(out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(stage1.run)
