"""The Two-Stage VAE's networks, plain `nn.Module`s with no I/O: the stage-1 image VAE (families InfoGAN,
WAE, ResNet), the stage-2 latent VAE, their losses, a synced BatchNorm, and sampling.

Import what you need from its module (`models.build`, `models.config`, ...): this package imports
nothing itself, so `models.config` and `models.geometry` stay torch-free for config validation.
"""
