"""Synchronised BatchNorm on CPU: 2 gloo processes with half a batch each equal 1 process with all of it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.config import ModelConfig
from tsvae_dist.models.sync_bn import DistributedBatchNorm, convert_sync_batchnorm

STEPS = 3
# kind: (batch, BN constructor, per-rank split of the batch, momentum). Uneven splits check the counts;
# a large offset on the inputs checks the variance is not computed as E[x²] − E[x]².
CASES = {
    "1d": (8, lambda m: nn.BatchNorm1d(5, momentum=m), (3, 5), None),
    "2d": (6, lambda m: nn.BatchNorm2d(4, momentum=m), (3, 3), 0.1),
}


def _shape(kind: str) -> tuple[int, ...]:
    batch = CASES[kind][0]
    return (batch, 5) if kind == "1d" else (batch, 4, 3, 5)


def _setup(kind: str) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The plain BN, STEPS input batches, STEPS upstream gradients and an eval batch, all seeded."""
    _, make, _, momentum = CASES[kind]
    gen = torch.Generator().manual_seed(1234)
    bn = make(momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    shape = _shape(kind)
    xs = [torch.randn(shape, generator=gen) * 3 + 1000 for _ in range(STEPS)]
    grads = [torch.randn(shape, generator=gen) for _ in range(STEPS)]
    return bn, xs, grads, torch.randn(shape, generator=gen) * 3 + 1000


def _run(bn: nn.Module, xs, grads, x_eval, rows: slice) -> dict[str, torch.Tensor]:
    """STEPS training passes on rows of each batch, then one eval pass; what the comparison needs."""
    bn.train()
    outs, in_grads = [], []
    for x, g in zip(xs, grads, strict=True):
        xr = x[rows].clone().requires_grad_(True)
        out = bn(xr)
        (out * g[rows]).sum().backward()
        outs.append(out.detach())
        in_grads.append(xr.grad)
    bn.eval()
    with torch.no_grad():
        eval_out = bn(x_eval[rows])
    return {
        "out": torch.cat(outs),
        "in_grad": torch.cat(in_grads),
        "weight_grad": bn.weight.grad.clone(),
        "bias_grad": bn.bias.grad.clone(),
        "eval_out": eval_out,
        **{k: v.clone() for k, v in bn.state_dict().items()},
    }


def _rows(kind: str, rank: int) -> slice:
    split = CASES[kind][2]
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _stage1_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    model = build_stage1(ModelConfig(family="infogan", latent_dim=4, width=1 / 16), 1, 16)
    return model, torch.rand(4, 1, 16, 16), torch.randn(4, 4)


def _stage1_grads(model: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    model(x, eps)["loss"].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for kind in CASES:
            bn, xs, grads, x_eval = _setup(kind)
            bn = convert_sync_batchnorm(bn)
            assert isinstance(bn, DistributedBatchNorm)
            res = _run(bn, xs, grads, x_eval, _rows(kind, rank))
            for key in ("weight_grad", "bias_grad"):  # what DDP's gradient reduction would sum
                dist.all_reduce(res[key])
            results[kind] = res
        # A converted model must be accepted by DDP on CPU (it refuses nn.SyncBatchNorm there).
        model, x, eps = _stage1_setup()
        ddp = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model))
        rows = slice(2 * rank, 2 * rank + 2)
        results["stage1_grads"] = _stage1_grads(ddp, x[rows], eps[rows])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _reassemble(ranks: list[dict], key: str, steps: int) -> torch.Tensor:
    """Rank results are [step 0 rows, step 1 rows, ...]; rebuild [step 0 batch, step 1 batch, ...]."""
    chunks = [r[key].chunk(steps) for r in ranks]
    return torch.cat([torch.cat([c[step] for c in chunks]) for step in range(steps)])


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.integration  # starts processes
def test_two_ranks_equal_one_process_with_the_whole_batch(two_rank_results, kind: str):
    bn, xs, grads, x_eval = _setup(kind)
    ref = _run(bn, xs, grads, x_eval, slice(None))
    ranks = [r[kind] for r in two_rank_results]
    for key, steps in (("out", STEPS), ("in_grad", STEPS), ("eval_out", 1)):
        got = _reassemble(ranks, key, steps)
        torch.testing.assert_close(got, ref[key], rtol=1e-4, atol=1e-4, msg=f"{kind} {key}")
    for key in ("weight_grad", "bias_grad", "running_mean", "running_var", "num_batches_tracked"):
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res[key], ref[key], rtol=1e-4, atol=1e-4, msg=f"{kind} {key} rank {r}")


@pytest.mark.integration  # starts processes
def test_ddp_stage1_with_synced_bn_equals_one_process(two_rank_results):
    model, x, eps = _stage1_setup()
    ref = _stage1_grads(model, x, eps)
    for res in two_rank_results:
        got = {name.removeprefix("module."): g for name, g in res["stage1_grads"].items()}
        assert list(got) == list(ref)
        for name, grad in ref.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_conversion_keeps_weights_buffers_and_state_dict_keys():
    torch.manual_seed(0)
    cfg = ModelConfig(family="resnet", latent_dim=4, width=1 / 16)
    plain = build_stage1(cfg, 3, 32)
    plain(torch.rand(4, 3, 32, 32), torch.randn(4, 4))  # move the running stats off their init
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    synced = convert_sync_batchnorm(plain)
    assert sum(isinstance(m, DistributedBatchNorm) for m in synced.modules()) == n_bn > 0
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in synced.modules())
    after = synced.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    # Checkpoints go both ways.
    fresh = build_stage1(cfg, 3, 32)
    fresh.load_state_dict(after, strict=True)
    convert_sync_batchnorm(build_stage1(cfg, 3, 32)).load_state_dict(before, strict=True)


def test_without_a_process_group_it_is_plain_batch_norm():
    torch.manual_seed(0)
    for plain in (nn.BatchNorm1d(3), nn.BatchNorm2d(3)):
        synced = convert_sync_batchnorm(type(plain)(3))
        synced.load_state_dict(plain.state_dict())
        x = torch.randn(6, 3) if isinstance(plain, nn.BatchNorm1d) else torch.randn(6, 3, 4, 4)
        torch.testing.assert_close(synced(x), plain(x))
        torch.testing.assert_close(synced.running_var, plain.running_var)
        synced.eval(), plain.eval()
        torch.testing.assert_close(synced(x), plain(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_it_is_torchs_sync_batch_norm():
    bn = convert_sync_batchnorm(nn.BatchNorm2d(3).cuda())
    assert isinstance(bn, nn.SyncBatchNorm) and bn.running_mean.is_cuda  # torch's, for its kernels
    x = torch.randn(4, 3, 5, 5, device="cuda")
    ref = nn.BatchNorm2d(3).cuda()
    torch.testing.assert_close(bn(x), ref(x))  # no process group: torch's kernels, plain batch norm
