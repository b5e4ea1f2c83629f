"""Loss terms against hand-computed values, fp32 under autocast, and γ learning on data a decoder can fit."""

from __future__ import annotations

import math

import torch

from tsvae_dist.models.build import build_stage1
from tsvae_dist.models.config import ModelConfig
from tsvae_dist.models.latent_vae import Stage2VAE
from tsvae_dist.models.losses import bernoulli_nll, gaussian_nll, kl_standard_normal


def test_kl_matches_hand_computation():
    mu = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    log_sigma = torch.tensor([[0.1, -0.3], [0.0, 0.7]])
    expected = []
    for m_row, s_row in zip(mu.tolist(), log_sigma.tolist(), strict=True):
        expected.append(
            sum(0.5 * (m * m + math.exp(2 * s) - 2 * s - 1) for m, s in zip(m_row, s_row, strict=True))
        )
    got = kl_standard_normal(mu, log_sigma)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(expected))
    # The prior itself has zero KL.
    torch.testing.assert_close(kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_gaussian_nll_matches_hand_computation_with_nonzero_log_gamma():
    x = torch.tensor([[[[0.2, 0.9], [0.4, 0.0]]], [[[1.0, 0.5], [0.3, 0.3]]]])  # [2, 1, 2, 2]
    x_hat = torch.tensor([[[[0.25, 0.7], [0.4, 0.1]]], [[[0.9, 0.5], [0.0, 0.6]]]])
    log_gamma = torch.tensor(-0.7)
    gamma = math.exp(-0.7)
    expected = [
        sum(
            (a - b) ** 2 / (2 * gamma**2) + (-0.7) + 0.5 * math.log(2 * math.pi)
            for a, b in zip(xs, hs, strict=True)
        )
        for xs, hs in zip(x.flatten(1).tolist(), x_hat.flatten(1).tolist(), strict=True)
    ]
    got = gaussian_nll(x, x_hat, log_gamma)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_bernoulli_nll_matches_hand_computation():
    x = torch.tensor([[0.0, 1.0, 0.3], [1.0, 1.0, 0.0]])
    logits = torch.tensor([[-2.0, 0.5, 1.5], [3.0, -1.0, 0.0]])
    expected = []
    for xs, ls in zip(x.tolist(), logits.tolist(), strict=True):
        total = 0.0
        for t, logit in zip(xs, ls, strict=True):
            p = 1 / (1 + math.exp(-logit))
            total -= t * math.log(p) + (1 - t) * math.log(1 - p)
        expected.append(total)
    got = bernoulli_nll(x, logits)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(expected))


def _tiny_stage1(decoder: str = "gaussian"):
    cfg = ModelConfig(family="infogan", latent_dim=8, width=0.125, decoder=decoder)
    return build_stage1(cfg, channels=1, resolution=16)


def test_stage1_forward_is_the_mean_of_per_sample_terms():
    torch.manual_seed(0)
    model = _tiny_stage1()
    with torch.no_grad():
        model.log_gamma.fill_(-0.4)
    model.eval()  # deterministic BN so we can recompute the terms from encode/decode
    x = torch.rand(3, 1, 16, 16)
    eps = torch.randn(3, 8)
    out = model(x, eps)
    mu, log_sigma = model.encode(x)
    x_hat = model.decode(mu + log_sigma.exp() * eps)
    kl = kl_standard_normal(mu, log_sigma)
    nll = gaussian_nll(x, x_hat, torch.tensor(-0.4))
    torch.testing.assert_close(out["kl"], kl.mean())
    torch.testing.assert_close(out["nll"], nll.mean())
    torch.testing.assert_close(out["loss"], (kl + nll).mean())
    torch.testing.assert_close(out["mse"], (x_hat - x).square().mean())
    torch.testing.assert_close(out["gamma"], torch.tensor(math.exp(-0.4)))
    assert out["loss"].requires_grad and not out["nll"].requires_grad


def test_cross_entropy_mode_has_no_gamma_and_uses_bernoulli():
    torch.manual_seed(0)
    model = _tiny_stage1("cross_entropy").eval()
    assert not hasattr(model, "log_gamma")
    x, eps = torch.rand(2, 1, 16, 16), torch.randn(2, 8)
    out = model(x, eps)
    assert "gamma" not in out
    mu, log_sigma = model.encode(x)
    logits = model.decode_logits(mu + log_sigma.exp() * eps)
    torch.testing.assert_close(out["nll"], bernoulli_nll(x, logits).mean())


def test_loss_terms_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = _tiny_stage1().eval()  # eval: BN and spectral norm deterministic, so we can recompute
    with torch.no_grad():
        model.log_gamma.fill_(-6.0)  # γ ≈ 2.5e-3: the 1/γ² regime the fp32 region exists for
    x, eps = torch.rand(4, 1, 16, 16), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, eps)
        mu, log_sigma = model.encode(x)
        logits = model.decode_logits(mu + log_sigma.exp() * eps)
    # The decoder's last layer runs in fp32 under autocast (models/layers.fp32), so its logits are fp32.
    assert logits.dtype == torch.float32
    for name, value in out.items():
        assert value.dtype == torch.float32, name
    # The same terms in float64 from the very same (bf16-rounded) decoder output.
    x_hat = torch.sigmoid(logits.double())
    nll64 = gaussian_nll(x.double(), x_hat, torch.tensor(-6.0, dtype=torch.float64)).mean()
    torch.testing.assert_close(out["nll"].double(), nll64, rtol=1e-5, atol=0)
    # In bf16 the same term would be off by far more than that.
    nll_bf16 = gaussian_nll(
        x.bfloat16(), torch.sigmoid(logits.bfloat16()), torch.tensor(-6.0, dtype=torch.bfloat16)
    ).mean()
    assert abs(nll_bf16.double() - nll64) > 1e-4 * abs(nll64)

    stage2 = Stage2VAE(latent_dim=4, hidden=16, depth=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = stage2(torch.randn(5, 4), torch.randn(5, 4))
    for name, value in out2.items():
        assert value.dtype == torch.float32, name


def test_gamma_x_falls_on_images_the_decoder_can_fit():
    torch.manual_seed(0)
    model = build_stage1(ModelConfig(family="infogan", latent_dim=8, width=0.125), channels=1, resolution=16)
    images = torch.rand(8, 1, 16, 16).round()  # 8 fixed binary images
    # Adam moves log γ by at most ~lr per step, so a short test needs a larger lr than the paper's.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        out = model(images, torch.randn(8, 8))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["mse"].item()
    assert out["gamma"].item() < 0.25, out["gamma"].item()  # from 1.0 at init
    assert out["mse"].item() < 0.1 * first


def test_gamma_z_falls_on_latents_from_a_low_dimensional_manifold():
    torch.manual_seed(0)
    latent, intrinsic = 8, 2
    basis = torch.randn(intrinsic, latent)
    model = Stage2VAE(latent_dim=latent, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        z = torch.randn(128, intrinsic) @ basis  # fresh samples, as stage 2 redraws ε every epoch
        out = model(z, torch.randn(128, latent))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["gamma"].item() < 0.25, out["gamma"].item()  # from 1.0 at init
