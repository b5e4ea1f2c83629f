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
