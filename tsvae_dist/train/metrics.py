"""The training metrics log: JSON lines on rank 0 (appended locally, rewritten whole on object stores)
plus TensorBoard, truncated on resume to the checkpoint's step so a resumed run's log equals an
uninterrupted one's."""

from __future__ import annotations

import json

from tsvae_dist import storage


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
            old = storage.read_text(self.url).splitlines()
            self.lines = [ln for ln in old if ln.strip() and json.loads(ln)["step"] <= resume_step]
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
