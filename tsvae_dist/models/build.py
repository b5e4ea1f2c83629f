"""Model construction from a validated `ModelConfig`."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .geometry import derived_num_scales
from .image_vae import Stage1VAE
from .infogan import InfoGANDecoder, InfoGANEncoder
from .latent_vae import Stage2VAE
from .layers import scaled
from .resnet import ResNetDecoder, ResNetEncoder
from .wae import WAEDecoder, WAEEncoder


def _networks(cfg: ModelConfig, channels: int, resolution: int) -> tuple[nn.Module, nn.Module]:
    args = (channels, resolution, cfg.latent_dim, cfg.width, cfg.bn_momentum)
    if cfg.family == "infogan":
        return InfoGANEncoder(*args), InfoGANDecoder(*args)
    if cfg.family == "wae":
        return WAEEncoder(*args), WAEDecoder(*args)
    common = dict(
        base_dim=scaled(cfg.resnet_base_dim, cfg.width),
        max_dim=scaled(cfg.resnet_max_dim, cfg.width),
        blocks_per_scale=cfg.resnet_blocks_per_scale,
        depth_per_block=cfg.resnet_depth_per_block,
        kernel=cfg.resnet_kernel_size,
        bn_momentum=cfg.bn_momentum,
    )
    encoder = ResNetEncoder(
        channels,
        cfg.latent_dim,
        num_scales=cfg.resnet_num_scales or derived_num_scales(resolution),
        fc_dim=scaled(cfg.resnet_fc_dim, cfg.width),
        **common,
    )
    return encoder, ResNetDecoder(channels, resolution, cfg.latent_dim, **common)


def build_stage1(cfg: ModelConfig, channels: int, resolution: int, gamma: str = "learned") -> Stage1VAE:
    """The stage-1 VAE of `cfg.family` for images of `channels` × `resolution`²; raises ConfigError.

    `gamma`: how γ_x is set, learned | optimal (the training config's `stage1.gamma`; models/gamma.py)."""
    cfg.validate(channels, resolution)
    encoder, decoder = _networks(cfg, channels, resolution)
    return Stage1VAE(
        encoder,
        decoder,
        latent_dim=cfg.latent_dim,
        channels=channels,
        resolution=resolution,
        likelihood=cfg.decoder,
        gamma=gamma,
    )


def build_stage2(cfg: ModelConfig, gamma: str = "learned") -> Stage2VAE:
    """The stage-2 VAE on κ-dimensional latents (`gamma`: learned | optimal γ_z); raises ConfigError."""
    cfg.validate_stage2()
    return Stage2VAE(cfg.latent_dim, cfg.stage2_hidden, cfg.stage2_depth, gamma=gamma)
