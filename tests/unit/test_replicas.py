"""The fixed-order gradient all-reduce: buckets planned from sizes alone, sent during backward in index
order, and a result that does not depend on when (or whether) a bucket went out early. Three real gloo
ranks: with two, any order of a sum gives the same bits."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from tsvae_dist.train.replicas import Replicas, plan_buckets

WORLD = 3


def test_buckets_cover_every_parameter_once_last_first_within_capacity() -> None:
    sizes = [100, 3, 600, 50, 50, 2000, 7, 64]
    plan = plan_buckets(sizes, first_bytes=4 * 100, bytes_per_bucket=4 * 700)
    assert [i for bucket in plan for i in bucket] == list(reversed(range(len(sizes))))
    assert plan == plan_buckets(list(sizes), first_bytes=4 * 100, bytes_per_bucket=4 * 700)  # sizes alone decide
    assert sum(4 * sizes[i] for i in plan[0]) <= 4 * 100
    for bucket in plan[1:]:  # a parameter above the capacity gets a bucket of its own
        assert len(bucket) == 1 or sum(4 * sizes[i] for i in bucket) <= 4 * 700
    assert [2000] in [[sizes[i] for i in b] for b in plan]
    assert plan_buckets([]) == []


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(5, 3)  # used on some ranks only; first, so in the last bucket
        self.layers = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                    nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        out = self.layers(x)
        return (out + self.extra(x) if use_extra else out).pow(2).mean()


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _step(model: Net, replicas: Replicas, xs: list[torch.Tensor], use_extra: bool, early: bool) -> list:
    """One step's gradients over len(xs) accumulation rounds; `early`: buckets may go out during backward."""
    model.zero_grad(set_to_none=True)
    sent_during_backward = []
    for i, x in enumerate(xs):
        if early and i == len(xs) - 1:
            replicas.expect_backward()
        (model(x, use_extra) / len(xs)).backward()
        sent_during_backward.append([b.work is not None for b in replicas._buckets])
    replicas.sync()
    return sent_during_backward


def _rank(rank: int, init_file: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                  timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(rank)  # different weights per rank: the replicas start from rank 0's
    model = Net()
    replicas = Replicas(model, average_buffers=True, first_bucket_bytes=4 * 60, bucket_bytes=4 * 300)
    assert len(replicas._buckets) >= 3
    weights = [p.detach().clone() for p in model.parameters()]
    gathered = [torch.empty_like(weights[0]) for _ in range(WORLD)]
    torch_dist.all_gather(gathered, weights[0])
    assert all(torch.equal(g, gathered[0]) for g in gathered)

    gen = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(8, 5, generator=gen) * 1e3 ** rank for _ in range(2)]  # magnitudes where order shows
    use_extra = rank != 1

    # Sent during the backward, in index order; the same bits as sending everything after it.
    sent = _step(model, replicas, xs[:1], use_extra, early=True)
    assert sent[-1][0], "the first bucket went out while backward ran"
    assert sent[-1] == sorted(sent[-1], reverse=True), "buckets are sent in index order"
    early = _grads(model)
    late_sent = _step(model, replicas, xs[:1], use_extra, early=False)
    assert not any(late_sent[-1])
    late = _grads(model)
    assert all(torch.equal(a, b) for a, b in zip(early, late, strict=True))

    # The mean over ranks, with this rank's missing gradient (`extra` on rank 1) as zero; every rank the same.
    model.zero_grad(set_to_none=True)
    model(xs[0], use_extra).backward()
    own = _grads(model)
    for mine, averaged in zip(own, early, strict=True):
        parts = [torch.empty_like(mine) for _ in range(WORLD)]
        torch_dist.all_gather(parts, mine)
        expected = torch.stack([p.double() for p in parts]).mean(0)
        torch.testing.assert_close(averaged.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
        copies = [torch.empty_like(averaged) for _ in range(WORLD)]
        torch_dist.all_gather(copies, averaged)
        assert all(torch.equal(c, copies[0]) for c in copies)

    # Accumulation: only the last round's gradients are final, so nothing goes out before it.
    sent = _step(model, replicas, xs, use_extra, early=True)
    assert not any(sent[0]) and sent[-1][0]
    accumulated = _grads(model)
    _step(model, replicas, xs, use_extra, early=False)
    assert all(torch.equal(a, b) for a, b in zip(accumulated, _grads(model), strict=True))

    # Buffers (BatchNorm's running statistics) are averaged too.
    mean = model.layers[1].running_mean
    copies = [torch.empty_like(mean) for _ in range(WORLD)]
    torch_dist.all_gather(copies, mean)
    assert all(torch.equal(c, copies[0]) for c in copies)

    # Closed: the hooks are gone, nothing is sent during backward.
    replicas.close()
    replicas.expect_backward()
    model(xs[0], use_extra).backward()
    assert not any(b.work is not None for b in replicas._buckets)
    replicas.sync()
    torch_dist.destroy_process_group()


@pytest.mark.integration  # starts processes
def test_three_ranks_overlap_backward_and_sum_in_one_order(tmp_path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
