"""Keyed noise: the row-wise draw is bit-identical to one generator per sample, whatever the batch."""

from __future__ import annotations

import torch

from tsvae_dist.runtime.noise import keyed_normal, stable_seed


def _per_sample(key: str, dim: int, *parts: object) -> torch.Tensor:
    gen = torch.Generator()
    gen.manual_seed(stable_seed(*parts, key))
    return torch.randn(dim, generator=gen)


def test_batched_draw_equals_the_per_sample_draw_bit_for_bit() -> None:
    keys = [f"{i:06d}" for i in range(37)]
    batch = keyed_normal(keys, 16, 3, "stage1", 5)
    assert batch.shape == (37, 16) and batch.dtype == torch.float32
    for i, key in enumerate(keys):
        assert torch.equal(batch[i], _per_sample(key, 16, 3, "stage1", 5))
    assert torch.equal(keyed_normal(keys[10:12], 16, 3, "stage1", 5), batch[10:12])  # batch-independent
    assert not torch.equal(keyed_normal(keys[:2], 16, 3, "stage1", 6), batch[:2])  # the epoch is a key part
    assert keyed_normal([], 16, 3).shape == (0, 16)
    assert torch.equal(keyed_normal(keys[:1], 8)[0], _per_sample(keys[0], 8))  # no parts: the key alone
