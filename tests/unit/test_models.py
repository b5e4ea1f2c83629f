"""Stage-1 families and stage 2: shapes at every supported size, config errors, architecture details."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from tsvae_dist.errors import ConfigError
from tsvae_dist.models.build import build_stage1, build_stage2
from tsvae_dist.models.config import ModelConfig
from tsvae_dist.models.geometry import decoder_start, derived_num_scales
from tsvae_dist.models.latent_vae import Stage2VAE

SUPPORTED = {
    "infogan": (28, 32, 64, 128),
    "wae": (32, 64, 128),
    "resnet": (28, 32, 64, 128, 256),
}
TINY = 1 / 16  # width for shape checks: the structure is the paper's, the channel counts tiny


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("family", "resolution"), [(f, r) for f, sizes in SUPPORTED.items() for r in sizes], ids=lambda v: str(v)
)
def test_every_family_round_trips_shapes(family: str, resolution: int, channels: int):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, latent_dim=6, width=TINY)
    model = build_stage1(cfg, channels, resolution)
    x = torch.rand(2, channels, resolution, resolution)
    mu, log_sigma = model.encode(x)
    assert mu.shape == log_sigma.shape == (2, 6)
    x_hat = model.decode(mu)
    assert x_hat.shape == x.shape
    assert x_hat.min() >= 0 and x_hat.max() <= 1
    out = model(x, torch.randn(2, 6))
    assert set(out) == {"loss", "kl", "nll", "mse", "gamma"}
    assert torch.isfinite(out["loss"])
    model.eval()
    assert model.sample(torch.randn(3, 6)).shape == (3, channels, resolution, resolution)


@pytest.mark.parametrize(
    ("family", "resolution", "channels", "setting"),
    [
        ("infogan", 30, 1, "dataset.resolution"),
        ("infogan", 256, 3, "dataset.resolution"),
        ("wae", 28, 1, "dataset.resolution"),
        ("wae", 256, 3, "dataset.resolution"),
        ("resnet", 36, 3, "dataset.resolution"),  # 9·2²: a 9×9 start is outside the family's shapes
        ("resnet", 14, 1, "dataset.resolution"),  # 7·2: fewer than two doublings
        ("infogan", 32, 2, "dataset.channels"),
    ],
)
def test_unsupported_combinations_raise_naming_the_setting(family, resolution, channels, setting):
    with pytest.raises(ConfigError, match=f"^{setting}:") as err:
        build_stage1(ModelConfig(family=family), channels, resolution)
    if setting == "dataset.resolution":
        assert f"model.family {family!r}" in str(err.value) and str(resolution) in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"family": "vgg"}, "model.family"),
        ({"decoder": "laplace"}, "model.decoder"),
        ({"width": 0.0}, "model.width"),
        ({"latent_dim": 0}, "model.latent_dim"),
        ({"resnet_kernel_size": 4}, "model.resnet_kernel_size"),
        ({"resnet_num_scales": -1}, "model.resnet_num_scales"),
        ({"resnet_max_dim": 16}, "model.resnet_max_dim"),
        ({"bn_momentum": 0.0}, "model.bn_momentum"),
        ({"stage2_depth": 0}, "model.stage2_depth"),
    ],
)
def test_invalid_fields_raise_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        ModelConfig(**change).validate(3, 32)


def test_stage2_build_validates_its_fields():
    with pytest.raises(ConfigError, match="^model.stage2_hidden:"):
        build_stage2(ModelConfig(stage2_hidden=0))


def test_model_config_is_a_hydra_structured_config():
    conf = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(conf, OmegaConf.create({"family": "resnet", "width": 0.5}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig) and cfg.family == "resnet" and cfg.width == 0.5


@pytest.mark.parametrize("decoder", ["gaussian", "cross_entropy"])
@pytest.mark.parametrize("family", ["infogan", "wae", "resnet"])
def test_every_parameter_gets_a_gradient(family: str, decoder: str):
    # DDP without find_unused_parameters needs this: no parameter may sit outside the loss.
    torch.manual_seed(0)
    model = build_stage1(ModelConfig(family=family, decoder=decoder, latent_dim=4, width=TINY), 1, 32)
    model(torch.rand(2, 1, 32, 32), torch.randn(2, 4))["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert hasattr(model, "log_gamma") == (decoder == "gaussian")


def test_infogan_has_spectral_norm_on_every_encoder_layer_only():
    model = build_stage1(ModelConfig(family="infogan", width=TINY), 1, 28)
    enc_layers = [m for m in model.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(enc_layers) == 4  # conv64, conv128, fc1024, fc 2κ
    for layer in enc_layers:
        assert parametrize.is_parametrized(layer, "weight")
        assert isinstance(layer.parametrizations.weight[0], _SpectralNorm)  # our fp32 subclass of it
    for layer in model.decoder.modules():
        assert not parametrize.is_parametrized(layer)
    # The paper's MNIST net at 28 px: 28 → 14 → 7, so fc3 sees 128·7·7 features (times the width).
    assert model.encoder.fc3.in_features == model.encoder.conv2.out_channels * 7 * 7
    # Power iteration brings the head's largest singular value to 1.
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model.encode(torch.rand(4, 1, 28, 28))
    sigma = torch.linalg.matrix_norm(model.encoder.fc4.weight.detach(), ord=2)
    assert abs(sigma.item() - 1.0) < 0.02


def test_infogan_bn_placement_follows_the_paper():
    enc = build_stage1(ModelConfig(family="infogan"), 3, 64).encoder
    names = [name for name, m in enc.named_children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert names == ["bn2", "bn3"]  # no BN after conv1 nor on the head
    assert (enc.conv1.out_channels, enc.conv2.out_channels, enc.fc3.out_features) == (64, 128, 1024)
    assert enc.fc3.in_features == 128 * 16 * 16 and enc.fc4.out_features == 128


def test_wae_matches_table_2_at_64():
    model = build_stage1(ModelConfig(family="wae"), 3, 64)
    convs = [m for m in model.encoder.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (128, (5, 5), (1, 1)),
        (256, (5, 5), (2, 2)),
        (512, (5, 5), (2, 2)),
        (1024, (5, 5), (2, 2)),
    ]
    assert model.decoder.fc.out_features == 8 * 8 * 1024
    deconvs = [m for m in model.decoder.features if isinstance(m, nn.ConvTranspose2d)]
    assert [(d.out_channels, d.stride) for d in deconvs] == [
        (512, (2, 2)),
        (256, (2, 2)),
        (128, (2, 2)),
        (3, (1, 1)),
    ]


def test_resnet_follows_the_original_layout():
    assert derived_num_scales(64) == 4  # the original CelebA run: --num-scale 4
    assert decoder_start(64) == (2, 5) and decoder_start(256) == (2, 7) and decoder_start(28) == (7, 2)
    model = build_stage1(ModelConfig(family="resnet", width=1 / 32, resnet_max_dim=256), 3, 256)
    downsamples = [m for m in model.encoder.features if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(downsamples) == derived_num_scales(256) - 1 == 5
    # Decoder channels halve from the cap down to base_dim at full size (base 1, cap 8 at this width).
    ups = [m.out_channels for m in model.decoder.features if isinstance(m, nn.ConvTranspose2d)]
    assert model.decoder.c0 == 8 and ups == [8, 8, 8, 8, 4, 2, 1]
    assert model.encoder.fc.shortcut.out_features == 16  # fc_dim 512 · 1/32


def test_stage2_concatenates_the_input_to_the_last_hidden_layer():
    torch.manual_seed(0)
    kappa, hidden, depth = 5, 32, 3
    model = build_stage2(ModelConfig(latent_dim=kappa, stage2_hidden=hidden, stage2_depth=depth))
    for body in (model.encoder.body, model.decoder.body):
        assert [layer.in_features for layer in body.layers] == [kappa] + [hidden] * (depth - 1)
        assert all(layer.out_features == hidden for layer in body.layers)
    assert model.encoder.mu.in_features == model.encoder.log_sigma.in_features == kappa + hidden
    assert model.decoder.z_hat.in_features == kappa + hidden
    # With the hidden path silenced, the heads see the input itself through the concatenation.
    with torch.no_grad():
        model.encoder.body.layers[-1].weight.zero_()
        model.encoder.body.layers[-1].bias.zero_()
    z = torch.randn(4, kappa)
    mu, _ = model.encode(z)
    torch.testing.assert_close(mu, z @ model.encoder.mu.weight[:, :kappa].T + model.encoder.mu.bias)


def test_stage2_sampling():
    torch.manual_seed(0)
    model = Stage2VAE(latent_dim=6, hidden=16, depth=2)
    with torch.no_grad():
        model.log_gamma.fill_(-1.5)
    u, eps = torch.randn(7, 6), torch.randn(7, 6)
    z = model.sample(u, eps)
    assert z.shape == (7, 6)
    torch.testing.assert_close(z, model.decode(u) + torch.exp(torch.tensor(-1.5)) * eps)
    out = model(torch.randn(7, 6), torch.randn(7, 6))
    assert set(out) == {"loss", "kl", "nll", "mse", "gamma"}


def test_default_stage2_is_the_papers():
    model = build_stage2(ModelConfig())
    assert [layer.out_features for layer in model.decoder.body.layers] == [1024] * 3
    assert model.log_gamma.item() == 0.0
