"""Small helpers shared by the stage-1 network families: width scaling and the original code's inits."""

from __future__ import annotations

from torch import nn


def scaled(count: int, width: float) -> int:
    """A hidden channel/feature count multiplied by the config's `width` (at least 1)."""
    return max(1, round(count * width))


def init_normal(module: nn.Module, std: float = 0.02) -> nn.Module:
    """N(0, std) weights and zero biases: the InfoGAN layers' init in the original TF code."""
    nn.init.normal_(module.weight, 0.0, std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def init_glorot(module: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases: tf.layers' default, used by the WAE and ResNet layers."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def conv_same(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Odd-kernel convolution with TF 'same' output size: ceil(side / stride)."""
    return init_glorot(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2))


def deconv_double(c_in: int, c_out: int, kernel: int) -> nn.ConvTranspose2d:
    """Odd-kernel stride-2 transposed convolution that exactly doubles the side (TF 'same')."""
    return init_glorot(nn.ConvTranspose2d(c_in, c_out, kernel, 2, padding=kernel // 2, output_padding=1))
