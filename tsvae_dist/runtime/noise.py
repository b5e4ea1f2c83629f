"""Noise keyed by (seed, purpose, sample key, epoch): results that do not depend on world size.

Every ε the pipeline draws for a sample comes from its own generator seeded by a stable hash of
what it is for, so a sample gets the same noise whichever rank, batch or worker handles it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text, identical in every process and Python version."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_normal(keys: Sequence[str], dim: int, *parts: object) -> torch.Tensor:
    """A [len(keys), dim] float32 standard-normal tensor, row i drawn from seed (parts..., keys[i])."""
    # One generator per row is what keys the noise by sample (no batched draw gives those bits): the
    # seeds are hashed up front and each row is drawn straight into the output, with no temporaries.
    prefix = ("\x1f".join(map(str, parts)),) if parts else ()  # joins as stable_seed(*parts, key) would
    out = torch.empty(len(keys), dim)
    gen = torch.Generator()
    for row, key in zip(out, keys, strict=True):
        gen.manual_seed(stable_seed(*prefix, key))
        torch.randn(dim, generator=gen, out=row)
    return out
