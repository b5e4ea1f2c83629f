"""`ModelConfig`: the networks of both stages (a hydra structured config; yaml in conf/ sets values)."""

from __future__ import annotations

from dataclasses import dataclass

from tsvae_dist.errors import ConfigError
from tsvae_dist.models.geometry import RESOLUTION_ERRORS

FAMILIES = tuple(RESOLUTION_ERRORS)  # stage-1 network families
GAMMA_MODES = ("learned", "optimal")  # how a stage sets its decoder std γ (models/gamma.py)
DECODERS = ("gaussian", "cross_entropy")
CHANNELS = (1, 3)


@dataclass
class ModelConfig:
    """Both stages' networks. Defaults are the paper's (InfoGAN nets, κ = 64, stage 2 3×1024)."""

    family: str = "infogan"  # stage-1 networks: infogan (the paper's neutral nets) | wae (Table 2) | resnet
    latent_dim: int = 64  # κ, the dimension of z (and of u in stage 2)
    decoder: str = "gaussian"  # gaussian (learned γ_x) | cross_entropy (Bernoulli: "VAE (cross-entr.)")
    width: float = 1.0  # multiplier on every stage-1 hidden channel/feature count; 1.0 = the paper's nets
    bn_momentum: float = 0.1  # BatchNorm running-stat momentum (torch convention; the original TF used 0.001)
    resnet_base_dim: int = 32  # resnet: channels of the first scale (the original's CelebA run: 32)
    resnet_num_scales: int = 0  # resnet: encoder scales; 0 = downsample until the map is <= 8×8 (64 px → 4)
    resnet_blocks_per_scale: int = 1  # resnet: residual blocks per scale (original default 1)
    resnet_depth_per_block: int = 2  # resnet: BN-ReLU-conv layers per residual block (original default 2)
    resnet_kernel_size: int = 3  # resnet: conv kernel side, odd (original default 3)
    resnet_max_dim: int = 1024  # resnet: channel cap, encoder and decoder
    resnet_fc_dim: int = 512  # resnet: width of the encoder's residual fc block (original default 512)
    stage2_hidden: int = 1024  # stage 2: units per dense layer (not scaled by `width`)
    stage2_depth: int = 3  # stage 2: dense ReLU layers in each of the encoder and decoder

    def validate_stage2(self) -> None:
        """The checks stage 2 alone needs (it never sees images)."""
        for name in ("latent_dim", "stage2_hidden", "stage2_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1; got {getattr(self, name)}")

    def validate(self, channels: int, resolution: int) -> None:
        """Raise ConfigError naming the field when these settings cannot build a model for the data."""
        if self.family not in FAMILIES:
            raise ConfigError(
                f"model.family: unknown family {self.family!r}; choose one of {sorted(FAMILIES)}"
            )
        if self.decoder not in DECODERS:
            raise ConfigError(
                f"model.decoder: unknown decoder {self.decoder!r}; choose one of {list(DECODERS)}"
            )
        if channels not in CHANNELS:
            raise ConfigError(f"dataset.channels: the models take {list(CHANNELS)} channels; got {channels}")
        reason = RESOLUTION_ERRORS[self.family](resolution)
        if reason is not None:
            raise ConfigError(
                f"dataset.resolution: model.family {self.family!r} supports resolutions {reason}; "
                f"got {resolution}"
            )
        self.validate_stage2()
        positive = {
            "resnet_base_dim": self.resnet_base_dim,
            "resnet_blocks_per_scale": self.resnet_blocks_per_scale,
            "resnet_depth_per_block": self.resnet_depth_per_block,
            "resnet_max_dim": self.resnet_max_dim,
            "resnet_fc_dim": self.resnet_fc_dim,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"model.{name}: must be >= 1; got {value}")
        if not self.width > 0:
            raise ConfigError(f"model.width: must be > 0; got {self.width}")
        if not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"model.bn_momentum: must be in (0, 1]; got {self.bn_momentum}")
        if self.resnet_num_scales < 0:
            raise ConfigError(
                f"model.resnet_num_scales: must be >= 0 (0 = derived); got {self.resnet_num_scales}"
            )
        if self.resnet_kernel_size < 1 or self.resnet_kernel_size % 2 == 0:
            raise ConfigError(
                f"model.resnet_kernel_size: must be odd (TF 'same' sizes); got {self.resnet_kernel_size}"
            )
        if self.resnet_max_dim < self.resnet_base_dim:
            raise ConfigError(
                f"model.resnet_max_dim: must be >= model.resnet_base_dim ({self.resnet_base_dim}); "
                f"got {self.resnet_max_dim}"
            )
