"""Resumable checkpoints on any fsspec URL: atomic, keep >= 2, refuse a changed config.

A checkpoint is one file `ckpt-<samples>.pt` written in a single atomic operation (temp file +
rename locally, one PUT on object stores), so a file that exists is complete unless the storage
itself broke it; a file that fails to load is skipped in favour of the previous one. The newest
`keep` files are kept; older ones are deleted only after the new one is committed.

`save_async` lets training go on while a checkpoint is written: the state is copied to host memory
first (so later steps cannot change it), then serialised and written in a background thread, one
write at a time. A failed write is raised by the next `save_async` or `wait`, never lost.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import torch

from tsvae_dist import storage
from tsvae_dist.config import RunConfig, flatten, to_container
from tsvae_dist.errors import CheckpointError
from tsvae_dist.layout import checkpoint_name, checkpoint_samples

log = logging.getLogger(__name__)

# Keys that may change between a checkpoint and its resume without changing the result.
NON_RESULT_KEYS = ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "progress_bar",
                   "stop_check_every_steps", "checkpoint_every_min")
NON_RESULT_LOADER_KEYS = ("workers", "prefetch_factor", "start_method", "max_skipped_samples", "record_keys")


def host_copy(state: Any) -> Any:
    """`state` with every tensor copied to host memory (a fresh copy even of CPU tensors)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(host_copy(v) for v in state)
    return state


class CheckpointStore:
    """The checkpoints of one training stage, in one directory."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = directory
        self.keep = keep
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_async(self, state: dict[str, Any], samples_seen: int) -> None:
        """Copy `state` to the host now, then `save` it in the background (after the previous write)."""
        self.wait()  # at most one write in flight; raises the previous one's error
        snapshot = host_copy(state)

        def write() -> None:
            try:
                self.save(snapshot, samples_seen)
            except BaseException as e:  # kept for the main thread: raised by the next save_async/wait
                self._error = e

        # Not a daemon: an interpreter exiting normally still finishes (commits) the write.
        self._writer = threading.Thread(target=write, name=f"checkpoint-{samples_seen}")
        self._writer.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) has committed; raise its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"{self.directory}: writing a checkpoint failed: {error}") from error

    def _committed(self) -> list[tuple[int, str]]:
        names = [(samples, n) for n in storage.listdir(self.directory)
                 if (samples := checkpoint_samples(n)) is not None]
        return sorted(names)

    def save(self, state: dict[str, Any], samples_seen: int) -> str:
        """Write `state` atomically as the checkpoint at `samples_seen`; prune the oldest beyond `keep`."""
        url = storage.join(self.directory, checkpoint_name(samples_seen))
        storage.makedirs(self.directory)
        storage.write_bytes_atomic(url, storage.torch_save_bytes({**state, "complete": True}))
        for _, name in self._committed()[: -self.keep]:
            storage.remove(storage.join(self.directory, name))
        return url

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads completely, or None. Broken files are skipped with a warning."""
        for _, name in reversed(self._committed()):
            url = storage.join(self.directory, name)
            try:
                state = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or corrupt file: fall back to the previous one
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", url, e)
                continue
            if not isinstance(state, dict) or not state.get("complete"):
                log.warning("checkpoint %s is incomplete; trying the previous one", url)
                continue
            state["url"] = url
            return state
        return None


def resume_config(cfg: RunConfig, stage: str, streams: int) -> dict[str, Any]:
    """The config keys a checkpoint of training stage `stage` depends on (a resume under others is refused).

    `streams`: the loader's effective stream count (the setting 0 means "world x workers").
    """
    c = to_container(cfg)
    train_cfg = {k: v for k, v in c[stage].items() if k not in NON_RESULT_KEYS}
    train_cfg["loader"] = {k: v for k, v in train_cfg["loader"].items() if k not in NON_RESULT_LOADER_KEYS}
    train_cfg["loader"]["streams"] = streams
    return {"seed": c["seed"], "dataset": c["dataset"], "model": c["model"], stage: train_cfg}


def resolved(config: dict[str, Any], stage: str, **effective: Any) -> dict[str, Any]:
    """`config` (a `resume_config`) with stage `stage`'s settings replaced by their effective values
    (`precision="auto"` by what it resolved to on this device), so that is what a checkpoint records
    and a resume compares. A config without the stage's section (a bare job, as benchmarks build)
    gains one holding just the effective values."""
    return {**config, stage: {**config.get(stage, {}), **effective}}


_MISSING = object()


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """`flatten`, except that an empty dict is a leaf of its own: {"a": {}} and {} differ at "a"."""
    if isinstance(data, dict) and not data and prefix:
        return {prefix[:-1]: {}}
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return flatten(data, prefix)


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same type: 1, 1.0 and True are three settings, not one."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys added, removed or changed (in value or type) between two nested config dicts."""
    a, b = _leaves(saved), _leaves(current)
    return sorted(k for k in a.keys() | b.keys() if not _same(a.get(k, _MISSING), b.get(k, _MISSING)))


def check_resumable(saved: dict[str, Any], current: dict[str, Any], url: str) -> None:
    """Refuse to resume under a config whose result-changing keys differ from the checkpoint's."""
    differ = config_differences(saved, current)
    if differ:
        raise CheckpointError(
            f"{url}: refusing to resume under a changed config; differing keys: {', '.join(differ)} "
            "(restore them, or start a new run_dir)"
        )
