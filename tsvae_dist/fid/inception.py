"""The FID Inception-v3: a torch-only port of the TF graph of 2015-12-05 used by TTUR's FID.

This is the "FID Inception" (pytorch-fid / torch-fidelity), not torchvision's Inception-v3. It
differs from the latter where the TF graph does:
- the 3x3 average pools inside the 35x35, 17x17 and first 8x8 blocks ignore the zero padding
  (TF's `avg_pool` with SAME padding divides by the number of real pixels);
- the last 8x8 block (`Mixed_7c`) pools its side branch with a *max* pool;
- inputs are resized to 299x299 with TF1's `resize_bilinear` (align_corners=False), whose source
  coordinate is `dst * in/out`, not PyTorch's half-pixel `(dst + 0.5) * in/out - 0.5`;
- pixels are scaled as (x - 128) / 128 from the uint8 range.

The attribute names give the state-dict layout of the commonly used converted weights
(`pt_inception-2015-12-05-6726825d.pth`: 566 keys, 23,850,960 parameters), so that file loads with
`strict=True`. The network returns the pool3 features (N, 2048) in the dtype of its weights:
`net.double()` runs the whole extractor in float64.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsvae_dist.errors import ConfigError
from tsvae_dist.fid.weights import SETTING, STANDARD_FILE, expected_sha256, fetch_verified, first_line

INPUT_SIZE = 299  # the TF graph's input resolution
FEATURE_DIM = 2048  # pool3


def _tf1_source_coords(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Lower/upper source indices and the float32 interpolation weight of each output pixel.

    TF1 computes everything here in float32: scale = float(in) / out, src = dst * scale,
    lower = floor(src), upper = min(lower + 1, in - 1), lerp = src - floor(src).
    """
    scale = torch.tensor(np.float32(in_size) / np.float32(out_size), dtype=torch.float32, device=device)
    src = torch.arange(out_size, dtype=torch.float32, device=device) * scale
    floor = torch.floor(src)
    lower = floor.long()
    upper = torch.clamp(lower + 1, max=in_size - 1)
    return lower, upper, src - floor


def resize_bilinear_tf1(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize of NCHW float images exactly as TF1's `resize_bilinear(align_corners=False)`.

    The weights are computed in float32 (as TF does); the interpolation runs in `x`'s dtype, in TF's
    order: along the width for the top and bottom source rows, then along the height.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1: expected a float NCHW tensor, got {tuple(x.shape)} {x.dtype}")
    in_h, in_w = x.shape[2], x.shape[3]
    if (in_h, in_w) == (height, width):
        return x  # scale 1: every lerp weight is 0, the resize is the identity
    y0, y1, wy = _tf1_source_coords(in_h, height, x.device)
    x0, x1, wx = _tf1_source_coords(in_w, width, x.device)
    wy = wy.to(x.dtype).view(1, 1, height, 1)
    wx = wx.to(x.dtype).view(1, 1, 1, width)

    def along_width(rows: Tensor) -> Tensor:
        left, right = rows.index_select(3, x0), rows.index_select(3, x1)
        return left + (right - left) * wx

    top = along_width(x.index_select(2, y0))
    bottom = along_width(x.index_select(2, y1))
    return top + (bottom - top) * wy


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 1e-3), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_3x3_tf(x: Tensor) -> Tensor:
    # TF's SAME-padded average pool divides by the count of real pixels, not by 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


# Kernel shapes of the factorised 7x7 and 3x3 convolutions, with the padding keeping the size.
_1x7, _7x1, _1x3, _3x1 = (1, 7), (7, 1), (1, 3), (3, 1)
_P1x7, _P7x1, _P1x3, _P3x1 = (0, 3), (3, 0), (0, 1), (1, 0)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch5x5_1, self.branch5x5_2),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_3x3_tf(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction block."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 channels inside)."""

    def __init__(self, in_ch: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, _1x7, padding=_P1x7)
        self.branch7x7_3 = BasicConv2d(c7, 192, _7x1, padding=_P7x1)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, _7x1, padding=_P7x1)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, _1x7, padding=_P1x7)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, _7x1, padding=_P7x1)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, _1x7, padding=_P1x7)
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5),
            self.branch_pool(_avg_pool_3x3_tf(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction block."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, _1x7, padding=_P1x7)
        self.branch7x7x3_3 = BasicConv2d(192, 192, _7x1, padding=_P7x1)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads; `max_pool` selects the TF graph's pooling of Mixed_7c."""

    def __init__(self, in_ch: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, _1x3, padding=_P1x3)
        self.branch3x3_2b = BasicConv2d(384, 384, _3x1, padding=_P3x1)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, _1x3, padding=_P1x3)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, _3x1, padding=_P3x1)
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        # The TF graph max-pools here in its last block (Mixed_7c); every other block averages.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3_tf(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionNet(nn.Module):
    """FID Inception-v3: uint8-range NCHW images (1 or 3 channels, any size) -> pool3 features (N, 2048).

    Randomly initialised; load the converted TF weights with `tsvae_dist.fid.load_inception`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # The 1008-way classifier is not used for FID; it is kept so the standard weights file,
        # which contains it, loads with strict=True (a strict load catches a wrong or truncated file).
        self.fc = nn.Linear(FEATURE_DIM, 1008)
        self.weights_sha256: str | None = None  # set by load_inception: identifies the weights (cache keys)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"InceptionNet: expected NCHW images with 1 or 3 channels, got {tuple(images.shape)}")
        w = self.fc.weight
        x = images.to(device=w.device, dtype=w.dtype)
        x = resize_bilinear_tf1(x, INPUT_SIZE, INPUT_SIZE)
        x = x.expand(-1, 3, -1, -1)  # grayscale: the same plane on R, G and B (no-op for RGB)
        x = (x - 128) / 128
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                   self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3


@contextmanager
def fp32_precision() -> Iterator[None]:
    """Run CUDA convolutions and matmuls in true fp32 (no TF32) inside the block, then restore.

    Recent torch lets cuDNN convolutions use TF32 by default, which moves Inception features by
    ~1e-3 relative and FID with them. The legacy `allow_tf32` setters are used because they work
    whichever API the rest of the program used; each flag is restored through the API it was
    readable from (reading a legacy flag raises once the new `fp32_precision` API has been used).
    """
    flags = [(torch.backends.cudnn, torch.backends.cudnn.conv), (torch.backends.cuda.matmul,) * 2]
    saved = []
    for legacy, new in flags:
        try:
            saved.append(("legacy", legacy.allow_tf32))
        except RuntimeError:
            saved.append(("new", new.fp32_precision))
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        for (legacy, new), (api, value) in zip(flags, saved, strict=True):
            if api == "legacy":
                legacy.allow_tf32 = value
            else:
                new.fp32_precision = value


def extract_features(net: InceptionNet, images: Tensor) -> Tensor:
    """Pool3 features of one batch, without autograd and in true fp32 on CUDA."""
    with torch.inference_mode(), fp32_precision():
        return net(images)


# ---------------------------------------------------------------------------------------------
# Loading the weights


def _check_layout(net: InceptionNet, state: object, weights: str) -> None:
    """One-line ConfigError unless `state` has exactly the FID Inception keys and shapes."""
    if not isinstance(state, dict):
        raise ConfigError(f"{SETTING}: '{weights}' holds a {type(state).__name__}, not a state dict")
    wanted = net.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ConfigError(
            f"{SETTING}: '{weights}' is not an FID Inception state dict: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, value in wanted.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != value.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ConfigError(
                f"{SETTING}: '{weights}' is not an FID Inception state dict: {key} has shape {shape}, "
                f"expected {tuple(value.shape)}")


def load_inception(weights: str, sha256: str | None, cache_dir: str) -> InceptionNet:
    """The FID Inception with the configured weights, in eval mode, on the CPU, without gradients.

    Its `weights_sha256` attribute holds the full SHA-256 of the loaded file (for cache keys).

    weights: local path, or URL (http(s) through urllib; s3://, file://, ... through
      `tsvae_dist.storage`), of the converted TF weights; a URL is downloaded once into
      `cache_dir` and reused while its hash matches.
    sha256: the file's full SHA-256; None derives the expected prefix from the file name's
      `-<hex>.` suffix (the torch.hub rule), as for `pt_inception-2015-12-05-6726825d.pth`.
    cache_dir: where downloaded weights are kept.
    With several ranks, call it on one rank per node first (then a barrier) to download once.
    Every failure is a ConfigError naming `eval.inception_weights`.
    """
    if not weights:
        raise ConfigError(f"{SETTING}: not set; set it to the path or URL of {STANDARD_FILE}")
    data = fetch_verified(weights, expected_sha256(weights, sha256), cache_dir)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or non-torch file
        raise ConfigError(f"{SETTING}: '{weights}' is not a torch weights file: {first_line(e)}") from e
    net = InceptionNet()
    _check_layout(net, state, weights)
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = hashlib.sha256(data).hexdigest()
    return net.eval().requires_grad_(False)
