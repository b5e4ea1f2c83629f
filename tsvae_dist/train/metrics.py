"""The training metrics log: JSON lines on rank 0 (appended locally, rewritten whole on object stores)
plus TensorBoard, truncated on resume to the checkpoint's step so a resumed run's log equals an
uninterrupted one's."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from tsvae_dist import storage
from tsvae_dist.errors import CheckpointError
from tsvae_dist.runtime import dist

log = logging.getLogger(__name__)


def _kept_lines(url: str, text: str, resume_step: int) -> list[str]:
    """The non-blank lines of `text` (metrics.jsonl at `url`) with step <= resume_step.

    An unparsable last line is dropped with a warning: a kill mid-append (or a crash losing the end of
    an unsynced file) tears the line being written, which lies past the checkpoint anyway. One in the
    middle is not a torn write: a CheckpointError naming the file and line.
    """
    numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    kept = []
    for i, ln in numbered:
        try:
            step = json.loads(ln)["step"]
        except json.JSONDecodeError as e:
            if i == numbered[-1][0]:
                log.warning("%s: dropping line %d, unparsable (%s): torn by an interrupted write", url, i, e)
                continue
            raise CheckpointError(f"{url}: line {i} is not valid JSON ({e})") from e
        except (KeyError, TypeError) as e:  # valid JSON, but no object with a "step": never written by us
            raise CheckpointError(f"{url}: line {i} has no \"step\"") from e
        if step <= resume_step:
            kept.append(ln)
    return kept


class MetricsLog:
    """JSON lines on rank 0 (appended locally, rewritten whole on object stores) plus TensorBoard."""

    def __init__(self, url: str, tensorboard_dir: str, resume_step: int, enabled: bool):
        self.url = url
        self.enabled = enabled
        self.lines: list[str] = []
        self.tb = None
        if not enabled:
            return
        if storage.exists(self.url):  # drop lines past the checkpoint we resume from: they get redone
            self.lines = _kept_lines(self.url, storage.read_text(self.url), resume_step)
            storage.write_text_atomic(self.url, "".join(ln + "\n" for ln in self.lines))
        if "://" not in tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir, purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps({"step": step, **metrics}))
        if "://" not in self.url:
            with open(self.url, "a") as f:
                f.write(self.lines[-1] + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Persist (called with each checkpoint; on object stores this rewrites the object)."""
        if not self.enabled:
            return
        if "://" in self.url:
            storage.write_text_atomic(self.url, "".join(ln + "\n" for ln in self.lines))
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


class MetricsWindow:
    """The loss terms of the steps since the last metrics line, summed on the device (no host sync).

    `read` is the one place the sums reach the host: once per log window, all-reduced over ranks.
    A checkpoint carries every rank's partial sums (`state`), so a run resumed in the middle of a
    window writes the same line at its end as an uninterrupted run.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # float32 tensor (len(names),) on the device
        self.steps = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = sorted(terms)
        values = torch.stack([terms[k].detach().float() for k in self.names])
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1

    def read(self, world_size: int) -> dict[str, float]:
        """Means over the window's steps and over ranks (one all-reduce, one copy to the host); resets."""
        sums = dist.all_reduce_sum(self.sums.double())
        means = (sums / (self.steps * world_size)).tolist()
        out = dict(zip(self.names, means, strict=True))
        self.names, self.sums, self.steps = [], None, 0
        return out

    def state(self) -> dict[str, Any]:
        """Every rank's partial sums, gathered (a collective: call on every rank)."""
        if self.sums is None:
            return {"names": [], "steps": 0, "sums": None}
        return {"names": list(self.names), "steps": self.steps, "sums": dist.all_gather(self.sums).cpu()}

    def load(self, state: dict[str, Any] | None, rank: int, device: torch.device) -> None:
        if not state or state["sums"] is None:
            return
        self.names, self.steps = list(state["names"]), int(state["steps"])
        self.sums = state["sums"][rank].to(device)
