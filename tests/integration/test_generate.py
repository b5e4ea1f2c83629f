"""Sampling: sample i depends only on (seed, i), so sample sets do not depend on world size or batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.stagerun import run_stage, tiny_overrides
from tsvae_dist import storage
from tsvae_dist.cli import compose
from tsvae_dist.config import to_container
from tsvae_dist.models.build import build_stage1, build_stage2
from tsvae_dist.models.io import save_model
from tsvae_dist.models.sampling import MODES, sample_images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random stage-1 and stage-2 model artifacts in a run directory (their values do not matter here)."""
    root = tmp_path_factory.mktemp("generate")
    overrides = tiny_overrides(root / "data", root / "run")
    cfg = compose(overrides)
    torch.manual_seed(0)
    stage1 = build_stage1(cfg.model, cfg.dataset.channels, cfg.dataset.resolution).eval()
    stage2 = build_stage2(cfg.model).eval()
    for stage, model in (("stage1", stage1), ("stage2", stage2)):
        storage.makedirs(str(root / "run" / stage))
        save_model(cfg.layout.model(stage), model, to_container(cfg), stage, samples_seen=0)
    return {"root": root, "overrides": overrides, "cfg": cfg, "stage1": stage1, "stage2": stage2}


@pytest.mark.parametrize("mode", MODES)
def test_samples_depend_on_index_and_seed_only(models, mode):
    cfg, device = models["cfg"], torch.device("cpu")

    def sample(indices, seed=cfg.seed):
        return sample_images(mode, models["stage1"], models["stage2"], indices, cfg.model.latent_dim, seed, "eval",
                             device)

    whole = sample(range(10))
    assert whole.shape == (10, 3, 32, 32) and 0 <= whole.min() and whole.max() <= 1
    # The same chunks in another order, on "another rank": bit-identical.
    chunks = [range(0, 4), range(4, 8), range(8, 10)]
    assert torch.equal(torch.cat([sample(c) for c in reversed(chunks)]), torch.cat([whole[8:], whole[4:8], whole[:4]]))
    # Other batch compositions draw the same noise: equal up to float rounding.
    odd = torch.cat([sample(c) for c in ([9, 7], [5, 3], [1])]).flip(0)
    torch.testing.assert_close(odd, whole[1::2], rtol=0, atol=1e-6)
    assert (sample(range(10), seed=cfg.seed + 1) - whole).abs().max() > 1e-5  # the seed matters (random nets: small)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generated_shards_equal_for_world_1_and_2_and_rerun_skips(models):
    root, overrides = models["root"], models["overrides"]
    common = [*overrides, "generate.num=10", "generate.format=shards", "generate.samples_per_shard=4"]
    run_stage("generate", [*common, "generate.batch_size=3", f"generate.out={root / 'g1'}"])
    run_stage("generate", [*common, "generate.batch_size=3", f"generate.out={root / 'g2'}"], nproc=2)
    one, two = _files(root / "g1"), _files(root / "g2")
    assert sorted(one) == ["manifest.json"] + [f"samples/shard-{s:06d}.tar{ext}" for s in range(3)
                                               for ext in ("", ".done")]
    assert one == two

    # A re-run finds every shard done (same models and settings) and rewrites none.
    shards = sorted((root / "g1" / "samples").iterdir())
    before = {p: p.stat().st_mtime_ns for p in shards}
    run_stage("generate", [*common, "generate.batch_size=3", f"generate.out={root / 'g1'}"])
    assert {p: p.stat().st_mtime_ns for p in shards} == before
    assert _files(root / "g1") == one
