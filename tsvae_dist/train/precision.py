"""Mixed precision behind one helper: the autocast context and the gradient scaler for a setting.

One code path for fp32, bf16 and fp16, on CPU and GPU. Only fp16 needs a GradScaler (its range
underflows small gradients); bf16 has fp32's range. The models compute the γ and KL terms in fp32
whatever this says (see models/losses.py).
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager as ContextManager

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: torch.device) -> str:
    """The effective precision: "auto" is bf16 on CUDA (fp32's range, tensor-core speed) and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The forward-pass context for `precision` ("fp32" is a no-op; "auto" is resolved for `device`)."""
    precision = resolve(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def resolve_memory_format(setting: str, model: torch.nn.Module, device: torch.device) -> str:
    """The effective memory format: "auto" is channels_last for a convolutional model on CUDA (cuDNN's
    NHWC kernels are the fast ones under bf16/TF32), contiguous otherwise (CPU, MLPs)."""
    if setting != "auto":
        return setting
    has_conv = any(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in model.modules())
    return "channels_last" if device.type == "cuda" and has_conv else "contiguous"


def to_memory_format(t: torch.Tensor, memory_format: str) -> torch.Tensor:
    """`t` in `memory_format` when it is an image batch (4-D); other inputs pass unchanged."""
    if memory_format == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def compile_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Compile `model`'s forward in place (nn.Module.compile: the state-dict keys stay the same, so
    checkpoints load either way). Opt-in: the first steps pay the compile time, per shape."""
    model.compile()
    return model


def configure_kernels(deterministic: bool, tf32: bool, device: torch.device) -> None:
    """Set the process's kernel policy explicitly (never torch's defaults by accident).

    `tf32`: TF32 tensor cores for matmuls and convolutions (off: full fp32). `deterministic`: cuDNN's
    deterministic algorithms and torch's deterministic-algorithm mode (an op without one raises), no
    autotuning; otherwise `cudnn.benchmark` picks the fastest algorithm per shape, which may differ
    between processes, so a resumed run on CUDA is bit-exact only with `deterministic`.
    """
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if device.type == "cuda":
        if deterministic:  # cuBLAS needs a fixed workspace to be deterministic; read at its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(deterministic)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (a disabled one passes calls through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def adam(params, lr: float, betas: tuple[float, float], eps: float, device: torch.device) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedAdam when importable on a GPU, else torch's Adam (fused on GPU)."""
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # optional; never a requirement

            return FusedAdam(params, lr=lr, betas=betas, eps=eps, adam_w_mode=False)
        except ImportError:
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
