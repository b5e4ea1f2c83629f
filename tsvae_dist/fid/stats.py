"""Sharded Gaussian statistics of features and the Fréchet distance between two Gaussians.

Each rank sums its own features, in float64, as Σf and Σffᵀ with an exact count (no padded
duplicates); one all-reduce of these sufficient statistics gives the global mean and covariance,
so no features are ever gathered and the result does not depend on the world size.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from tsvae_dist import storage
from tsvae_dist.errors import CheckpointError, DataError


class FeatureStats:
    """Running float64 Σf, Σffᵀ and count of d-dimensional features: one rank's, until `all_reduce`."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.reduced = False  # True once the sums are global: adding or reducing again would double-count

    def add(self, features: Tensor) -> None:
        """Add a batch of features (N, dim); every row counts once."""
        if self.reduced:
            raise RuntimeError("FeatureStats.add: the statistics are already all-reduced")
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"FeatureStats.add: expected (N, {self.dim}) features, got {tuple(features.shape)}")
        f = features.detach().to(device=self.sum.device, dtype=torch.float64)
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f
        self.count += f.shape[0]

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics over all ranks, in place (every rank gets the totals); returns self.

        Only marks the sums global when torch.distributed is not initialised. One collective on
        one packed float64 buffer; counts stay exact (float64 holds integers exactly up to 2**53).
        With NCCL the buffer travels through the current CUDA device; gloo reduces CPU tensors.
        """
        if self.reduced:
            raise RuntimeError("FeatureStats.all_reduce: already all-reduced (a second sum double-counts)")
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
            packed = torch.cat([self.sum, self.sum_outer.flatten(), count])
            nccl = dist.get_backend() == "nccl"
            buffer = packed.to(torch.device("cuda", torch.cuda.current_device()) if nccl else packed.device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            packed = buffer.to(self.sum.device)
            d = self.dim
            self.sum.copy_(packed[:d])
            self.sum_outer.copy_(packed[d:d + d * d].view(d, d))
            self.count = int(round(packed[-1].item()))
        self.reduced = True
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean μ = s/n and unbiased covariance Σ = (S − nμμᵀ)/(n − 1), float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.mean_cov: needs at least 2 features, has {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.T) / 2  # exactly symmetric, whatever the matmul's summation order was
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's partial sums for a checkpoint, so a preempted evaluation resumes where it stopped."""
        if self.reduced:
            raise RuntimeError("FeatureStats.state_dict: checkpoint the partial sums before all_reduce")
        return {"count": torch.tensor(self.count, dtype=torch.int64),
                "sum": self.sum.cpu().clone(), "sum_outer": self.sum_outer.cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        d = self.dim
        if set(state) != {"count", "sum", "sum_outer"}:
            raise CheckpointError(
                f"FeatureStats: state has keys {sorted(state)}, expected count, sum, sum_outer")
        if tuple(state["sum"].shape) != (d,) or tuple(state["sum_outer"].shape) != (d, d):
            raise CheckpointError(
                f"FeatureStats: saved statistics have dimension {tuple(state['sum'].shape)}, expected ({d},)")
        self.count = int(state["count"])
        self.reduced = False
        self.sum.copy_(state["sum"])
        self.sum_outer.copy_(state["sum_outer"])


def save_reference_stats(url: str, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
    """Write μ, Σ and n as an .npz (keys `mu`, `sigma`, as TTUR's and pytorch-fid's files), atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
             count=np.int64(count))
    storage.write_bytes_atomic(url, buf.getvalue())


def load_reference_stats(url: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """μ, Σ and n (None for files without a count, e.g. TTUR's) from an .npz, never unpickling."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as npz:
            if "mu" not in npz or "sigma" not in npz:
                raise DataError(
                    f"{url}: reference statistics need keys 'mu' and 'sigma', found {sorted(npz.files)}")
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            count = int(npz["count"]) if "count" in npz else None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{url}: not a readable .npz of reference statistics: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{url}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    return mu, sigma, count


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, in float64.

    Why this form: tr (Σ₁Σ₂)^½ is the sum of the square roots of the eigenvalues of Σ₁Σ₂, which
    are those of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½. Both square roots therefore come from
    symmetric eigendecompositions (`eigh`: real, stable, no spurious imaginary parts), with
    round-off negatives clipped to 0, which also handles singular covariances (n < d) without
    the regularising offset `scipy.linalg.sqrtm` needs.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape} "
                         f"are not (d,), (d, d) for one d")
    evals1, evecs1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt1 = (evecs1 * np.sqrt(np.clip(evals1, 0, None))) @ evecs1.T
    middle = sqrt1 @ sigma2 @ sqrt1
    evals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(evals, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
