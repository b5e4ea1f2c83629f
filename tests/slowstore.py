"""`python -m tests.slowstore <out> <delay_s> <hold_from_samples> [overrides]` (under torchrun): stage 1
with slow checkpoint storage, each rank's optimizer-step times recorded.

A checkpoint write at `hold_from_samples` samples or more sleeps `delay_s` before writing (the file
`<out>.writing` says one is in flight, and `<out>.writes` gets a JSON line `[samples, start, end]` when
it has finished); each rank writes the time of every optimizer step, as a JSON list, to `<out>.<rank>`
at the end. All times are `time.monotonic()`: one clock for every process on the machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from tsvae_dist import storage
from tsvae_dist.cli import main
from tsvae_dist.layout import checkpoint_samples
from tsvae_dist.stages import stage1

if __name__ == "__main__":
    out, delay, hold_from = sys.argv.pop(1), float(sys.argv.pop(1)), int(sys.argv.pop(1))
    write = storage.write_bytes_atomic

    def slow_write(url: str, data: bytes) -> None:
        samples = checkpoint_samples(url.rsplit("/", 1)[-1])
        if samples is not None and samples >= hold_from:
            Path(f"{out}.writing").write_text(url)
            start = time.monotonic()
            time.sleep(delay)
            write(url, data)
            with open(f"{out}.writes", "a") as f:
                f.write(json.dumps([samples, start, time.monotonic()]) + "\n")
            return
        write(url, data)

    storage.write_bytes_atomic = slow_write
    times: list[float] = []
    step = torch.optim.Adam.step

    def timed_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        times.append(time.monotonic())
        return result

    torch.optim.Adam.step = timed_step
    train = stage1.train

    def recorded(job, cfg, info, *args, **kwargs):
        try:
            return train(job, cfg, info, *args, **kwargs)
        finally:
            Path(f"{out}.{info.rank}").write_text(json.dumps(times))

    stage1.train = recorded
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(stage1.run)
