"""Feature statistics and the Fréchet distance: closed forms, scipy parity, sharded = single-process."""

import io
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tsvae_dist.errors import CheckpointError, DataError
from tsvae_dist.fid.stats import FeatureStats, frechet_distance, load_reference_stats, save_reference_stats


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_unit_mean_shift_in_2048_dims():
    d = 2048
    fid = frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d))
    assert fid == pytest.approx(2048.0, abs=1e-8)


def test_frechet_one_dimensional_closed_form():
    # N(1, 4) vs N(3, 9): (1 - 3)^2 + 4 + 9 - 2 * sqrt(4 * 9) = 4 + 13 - 12 = 5
    fid = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert fid == pytest.approx(5.0, abs=1e-12)


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    sigma = _random_spd(rng, 64)
    mu = rng.standard_normal(64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_identical_singular_covariance_is_zero():
    # Fewer samples than dimensions: rank-deficient covariances, where sqrtm struggles.
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((20, 64))
    sigma = np.cov(feats, rowvar=False)
    assert abs(frechet_distance(feats.mean(0), sigma, feats.mean(0), sigma)) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize("d", [3, 16, 50])
def test_frechet_matches_scipy_sqrtm_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    diff = mu1 - mu2
    reference = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(reference, rel=1e-10)  # symmetric


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _features(n: int = 37, d: int = 24) -> np.ndarray:
    # float32 like Inception's output, with an offset mean so that S - n mu mu^T cancels for real
    rng = np.random.default_rng(1234)
    return (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + 3.0).astype(np.float32)


def test_mean_cov_matches_numpy_single_process():
    feats = _features()
    stats = FeatureStats(feats.shape[1])
    for chunk in np.array_split(feats, [5, 6, 30]):  # uneven batches, one of size 1
        stats.add(torch.from_numpy(chunk))
    mu, sigma = stats.all_reduce().mean_cov()  # no process group: the sums are already the totals
    assert stats.count == feats.shape[0]
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)


def _sharded_worker(rank: int, world: int, init_file: str, out_dir: str, splits: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        feats = torch.from_numpy(_features())
        start = sum(splits[:rank])
        mine = feats[start:start + splits[rank]]
        stats = FeatureStats(feats.shape[1])
        for chunk in torch.split(mine, 4):  # several batches, the last one short
            stats.add(chunk)
        stats.add(mine[:0])  # an empty batch changes nothing
        assert stats.count == splits[rank]
        mu, sigma = stats.all_reduce().mean_cov()  # in place: every rank holds the totals
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), mu=mu, sigma=sigma, count=stats.count)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("splits", [[37], [30, 7], [0, 25, 12]], ids=["world1", "world2", "world3"])
@pytest.mark.integration  # starts processes
def test_sharded_stats_equal_numpy_cov_of_all_features(tmp_path, splits):
    world = len(splits)
    mp.spawn(_sharded_worker, args=(world, str(tmp_path / "init"), str(tmp_path), splits), nprocs=world)
    feats = _features().astype(np.float64)
    for rank in range(world):
        with np.load(tmp_path / f"rank{rank}.npz", allow_pickle=False) as out:
            assert int(out["count"]) == feats.shape[0]
            np.testing.assert_allclose(out["mu"], feats.mean(0), rtol=0, atol=1e-10)
            np.testing.assert_allclose(out["sigma"], np.cov(feats, rowvar=False), rtol=0, atol=1e-10)


def test_state_dict_resume_equals_uninterrupted():
    feats = torch.from_numpy(_features())
    whole = FeatureStats(feats.shape[1])
    whole.add(feats[:20])
    whole.add(feats[20:])

    first = FeatureStats(feats.shape[1])
    first.add(feats[:20])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = FeatureStats(feats.shape[1])
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    resumed.add(feats[20:])

    assert resumed.count == whole.count == 37
    assert torch.equal(resumed.sum, whole.sum)
    assert torch.equal(resumed.sum_outer, whole.sum_outer)


def test_load_state_dict_rejects_other_dimension():
    with pytest.raises(CheckpointError, match="dimension"):
        FeatureStats(8).load_state_dict(FeatureStats(4).state_dict())


def test_reduced_stats_refuse_more_features_a_second_reduction_and_checkpoints():
    stats = FeatureStats(3)
    stats.add(torch.ones(2, 3))
    assert stats.all_reduce() is stats
    for call in (lambda: stats.add(torch.ones(1, 3)), stats.all_reduce, stats.state_dict):
        with pytest.raises(RuntimeError, match="all.reduce"):
            call()


def test_mean_cov_needs_two_features():
    stats = FeatureStats(3)
    stats.add(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()


def test_add_rejects_wrong_feature_dim():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        FeatureStats(3).add(torch.ones(2, 4))


def test_reference_stats_roundtrip_and_ttur_layout(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(5), _random_spd(rng, 5)
    save_reference_stats(str(tmp_path / "ref.npz"), mu, sigma, 10000)
    got_mu, got_sigma, count = load_reference_stats(str(tmp_path / "ref.npz"))
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma) and count == 10000

    np.savez(tmp_path / "ttur.npz", mu=mu.astype(np.float32), sigma=sigma)  # no count, float32 mean
    got_mu, _, count = load_reference_stats(str(tmp_path / "ttur.npz"))
    assert got_mu.dtype == np.float64 and count is None


def test_reference_stats_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "nokeys.npz", m=np.zeros(3))
    with pytest.raises(DataError, match=r"nokeys\.npz: .*'mu' and 'sigma'"):
        load_reference_stats(str(tmp_path / "nokeys.npz"))
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(DataError, match=r"pickled\.npz"):
        load_reference_stats(str(tmp_path / "pickled.npz"))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(DataError, match=r"shape\.npz: mu has shape"):
        load_reference_stats(str(tmp_path / "shape.npz"))
