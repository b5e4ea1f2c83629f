"""What the two readers over shards (`loader` for training, `prefetch` for encoding and evaluation)
share when they run in DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tsvae_dist.errors import DataError
from tsvae_dist.storage import StorageError

_ERROR, _ERROR_TYPE = "_error", "_error_type"  # keys of an item that carries a worker's exception
_PASSED = {"DataError": DataError, "StorageError": StorageError}  # what a worker hands over


def unit_float(images: np.ndarray) -> torch.Tensor:
    """uint8 → float32 in [0, 1], one IEEE division per pixel (the same bits in every stage).

    In numpy, single-threaded: torch's intra-op thread pool made this small conversion ~30x slower on
    a busy 2-core machine.
    """
    return torch.from_numpy(np.divide(images, np.float32(255.0), dtype=np.float32))


# unit_float's value of every uint8 level: the table `unit_float_on` looks up on the device.
_UNIT_LEVELS = np.divide(np.arange(256, dtype=np.uint8), np.float32(255.0), dtype=np.float32)
_unit_tables: dict[torch.device, torch.Tensor] = {}


def unit_float_on(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → float32 in [0, 1] on `device`, bit for bit `unit_float`'s values.

    The uint8 tensor is copied (asynchronously from pinned memory), then scaled there by a 256-entry
    table lookup: exact on any device, where a division by a scalar may not be (CUDA multiplies by the
    scalar's reciprocal, which rounds differently for some levels).
    """
    table = _unit_tables.get(device)
    if table is None:
        table = _unit_tables[device] = torch.from_numpy(_UNIT_LEVELS).to(device)
    levels = images.to(device, non_blocking=True)
    return torch.index_select(table, 0, levels.reshape(-1).int()).reshape(levels.shape)


def as_is(item: Any) -> Any:
    """The DataLoader's collate step: none (its default would turn numpy arrays into tensors)."""
    return item


def error_item(error: DataError | StorageError) -> dict[str, str]:
    """A worker's exception as an item: raised again in the main process by `raise_if_error` with its
    one-line message, no worker traceback and no reference cycle through the DataLoader iterator."""
    return {_ERROR: str(error), _ERROR_TYPE: type(error).__name__}


def raise_if_error(item: Any) -> None:
    if isinstance(item, dict) and _ERROR in item:
        raise _PASSED.get(item[_ERROR_TYPE], DataError)(item[_ERROR])


def stop_workers(items: Iterator) -> None:
    """Stop a DataLoader iterator's workers now. Left to the garbage collector (an exception's traceback
    keeps the iterator in a reference cycle), torch's shutdown finds its queues already finalised and
    waits 5 s per worker."""
    shutdown = getattr(items, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
