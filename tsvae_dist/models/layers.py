"""Small helpers shared by the stage-1 network families: width scaling and the original code's inits."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm


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


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Meta tensors (shape-only model builds) have no autocast to turn off.
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in float32 whatever the autocast: the output heads (μ, log σ, the decoder's last layer).

    Their outputs feed exp(log σ), softplus + 1e-6 and the 1/γ²-scaled reconstruction term, where
    bf16's 8-bit mantissa is too coarse. A function, not a wrapper module, so state_dict keys stay.
    """
    with _no_autocast(x.device):
        return layer(x.float())


class _Fp32SpectralNorm(_SpectralNorm):
    """torch's spectral norm with the power iteration and W/σ in float32 even under autocast.

    Under autocast the matrix-vector products would round σ (and the u, v estimates carried from
    step to step) to bf16/fp16; the state_dict keys (`original`, `0._u`, `0._v`) are torch's own.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with _no_autocast(weight.device):
            return super().forward(weight.float())


def spectral_norm(layer: nn.Module) -> nn.Module:
    """`torch.nn.utils.parametrizations.spectral_norm(layer)` (one power iteration), computed in fp32."""
    dim = 1 if isinstance(layer, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d) else 0
    parametrize.register_parametrization(layer, "weight", _Fp32SpectralNorm(layer.weight, 1, dim, 1e-12))
    return layer
