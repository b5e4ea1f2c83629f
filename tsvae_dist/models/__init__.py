"""The Two-Stage VAE's networks: stage-1 families (InfoGAN, WAE, ResNet), stage 2, losses, sync BN."""

from .build import build_stage1, build_stage2
from .config import ModelConfig
from .stage1 import Stage1VAE
from .stage2 import Stage2VAE
from .sync_bn import DistributedBatchNorm, convert_sync_batchnorm

__all__ = [
    "DistributedBatchNorm",
    "ModelConfig",
    "Stage1VAE",
    "Stage2VAE",
    "build_stage1",
    "build_stage2",
    "convert_sync_batchnorm",
]
