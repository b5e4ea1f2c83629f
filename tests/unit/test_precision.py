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


TINY_FAMILIES = ("infogan", "wae", "resnet")


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("gamma", ["learned", "optimal"])
def test_stage1_heads_and_gamma_terms_are_fp32_under_bf16_autocast(family: str, gamma: str) -> None:
    from tsvae_dist.models.build import build_stage1
    from tsvae_dist.models.config import ModelConfig

    torch.manual_seed(0)
    model = build_stage1(ModelConfig(family=family, latent_dim=4, width=0.05, resnet_base_dim=8, resnet_max_dim=16,
                                     resnet_fc_dim=16), 1, 32, gamma=gamma).train()
    x = torch.rand(4, 1, 32, 32)
    with precision.autocast("bf16", x.device):
        body = model.encoder.conv1(x) if family == "infogan" else None
        mu, log_sigma = model.encode(x)
        logits = model.decode_logits(mu)
        terms = model(x, torch.randn(4, 4))
    if body is not None:
        assert body.dtype == torch.bfloat16  # autocast really is on for the body: the heads are the exception
    assert mu.dtype == log_sigma.dtype == logits.dtype == torch.float32
    for name in ("loss", "kl", "nll", "mse", "gamma"):
        assert terms[name].dtype == torch.float32, name
    assert model.log_gamma.dtype == torch.float32


def test_stage2_heads_and_gamma_terms_are_fp32_under_bf16_autocast() -> None:
    from tsvae_dist.models.latent_vae import Stage2VAE

    torch.manual_seed(0)
    model = Stage2VAE(4, hidden=16, depth=2, gamma="optimal").train()
    z = torch.randn(8, 4)
    with precision.autocast("bf16", z.device):
        hidden = model.encoder.body.layers[0](z)
        mu, log_sigma = model.encode(z)
        z_hat = model.decode(mu)
        terms = model(z, torch.randn(8, 4))
    assert hidden.dtype == torch.bfloat16
    assert mu.dtype == log_sigma.dtype == z_hat.dtype == torch.float32
    assert all(terms[k].dtype == torch.float32 for k in ("loss", "kl", "nll", "mse", "gamma"))
    assert model.log_gamma.dtype == torch.float32 and model.gamma_ema.dtype == torch.float64


def test_spectral_norm_power_iteration_is_fp32_under_bf16_autocast() -> None:
    from tsvae_dist.models.infogan import InfoGANEncoder

    torch.manual_seed(0)
    enc = InfoGANEncoder(1, 28, 4, 0.05, 0.1).train()
    x = torch.rand(4, 1, 28, 28)
    sn = enc.fc3.parametrizations.weight[0]
    with precision.autocast("bf16", x.device):
        enc(x)
        v_before = sn._v.clone()
        weight = enc.fc3.weight  # one power iteration (training mode), then W/σ as the layer sees it
    assert sn._u.dtype == sn._v.dtype == weight.dtype == torch.float32
    # The u update equals an fp32 recomputation from the previous v (bf16 products would be ~1e-3 off).
    w = enc.fc3.parametrizations.weight.original.detach()
    assert torch.allclose(sn._u, torch.nn.functional.normalize(w @ v_before, dim=0), atol=1e-6)
    sigma = torch.dot(sn._u, w @ sn._v)
    assert torch.allclose(weight.detach(), w / sigma, rtol=1e-6)


def test_model_state_dict_keys_are_torchs_own() -> None:
    # Checkpoints and artifacts of earlier runs must load: the fp32 heads add no nesting level.
    from tsvae_dist.models.build import build_stage1
    from tsvae_dist.models.config import ModelConfig

    keys = set(build_stage1(ModelConfig(family="infogan", width=0.05), 1, 28).state_dict())
    assert {"encoder.fc4.parametrizations.weight.original", "encoder.fc4.parametrizations.weight.0._u",
            "encoder.fc4.parametrizations.weight.0._v", "encoder.fc4.bias", "decoder.deconv4.weight"} <= keys
    wae_keys = set(build_stage1(ModelConfig(family="wae", width=0.05), 1, 32).state_dict())
    assert {"encoder.mu.weight", "encoder.log_sigma.weight", "decoder.features.9.weight"} <= wae_keys


@pytest.mark.parametrize("preset", ["cifar10", "paper", "synthetic"])
def test_stage2_trains_in_fp32_by_default(preset: str) -> None:
    from tsvae_dist.cli import compose

    assert compose([f"stage2={preset}"]).stage2.precision == "fp32"
    assert compose([f"stage2={preset}", "stage1.precision=bf16"]).stage2.precision == "fp32"
