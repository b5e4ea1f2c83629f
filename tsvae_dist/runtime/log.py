"""Logging for stage processes: rank 0 at INFO, the other ranks at WARNING, every line tagged with its rank."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    for noisy in ("aiobotocore", "botocore", "s3fs"):  # credential look-ups are not news
        logging.getLogger(noisy).setLevel(logging.WARNING)
