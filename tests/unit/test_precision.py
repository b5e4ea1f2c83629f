"""The precision helper: explicit kernel policy, fp32 heads and γ terms under autocast."""

from __future__ import annotations

import os

import pytest
import torch

from tsvae_dist.train import precision


@pytest.fixture
def restore_kernel_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4])
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("tf32", [False, True])
def test_kernel_policy_on_a_gpu_device(restore_kernel_flags, deterministic: bool, tf32: bool) -> None:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    precision.configure_kernels(deterministic, tf32, torch.device("cuda", 0))  # sets flags only: no GPU needed
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cudnn.benchmark is (not deterministic)  # autotuning only when results may vary
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") is not None) is deterministic


def test_kernel_policy_on_cpu_leaves_autotuning_off(restore_kernel_flags) -> None:
    precision.configure_kernels(False, True, torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False and torch.backends.cuda.matmul.allow_tf32 is True
    assert not torch.are_deterministic_algorithms_enabled()
