"""Which image sizes each stage-1 family can build, and the derived depths: plain arithmetic, no torch,
so a configuration is checked before any job (and without importing the networks)."""

from __future__ import annotations

from collections.abc import Callable

# The dense layers next to the (s/4)² map hold 2·1024·128·(s/4)² weights: 67M params in all at 64 px,
# 270M at 128, 1.1B at 256. We stop at 128; resnet is the family for larger images.
INFOGAN_MIN, INFOGAN_MAX = 8, 128


def infogan_resolution_error(resolution: int) -> str | None:
    """Why this family cannot build `resolution`, or None when it can."""
    if resolution % 4 or not INFOGAN_MIN <= resolution <= INFOGAN_MAX:
        return (
            f"multiples of 4 from {INFOGAN_MIN} to {INFOGAN_MAX} (e.g. 28, 32, 64, 128; its dense "
            "layers grow as side², 1.1B parameters at 256: use model.family=resnet there)"
        )
    return None


WAE_MIN, WAE_MAX = 16, 128


def wae_resolution_error(resolution: int) -> str | None:
    """Why this family cannot build `resolution`, or None when it can."""
    if resolution % 8 or not WAE_MIN <= resolution <= WAE_MAX:
        return (
            f"multiples of 8 from {WAE_MIN} to {WAE_MAX} (e.g. 32, 64, 128; its dense layers "
            "grow as side², ~200M parameters at 256: use model.family=resnet there)"
        )
    return None


RESNET_MIN, RESNET_MAX = 8, 1024
_MAX_START = 7  # largest decoder start side: the first dense layer holds s0²·dims[0]·κ weights
_POOL_SIDE = 8  # derived encoder depth: downsample until the feature map is at most 8×8


def decoder_start(resolution: int) -> tuple[int, int]:
    """(s0, doublings): the decoder's start side and how many times it doubles to `resolution`."""
    side, doublings = resolution, 0
    while side % 2 == 0 and side > 2:
        side, doublings = side // 2, doublings + 1
    return side, doublings


def derived_num_scales(resolution: int) -> int:
    """Encoder scales when not set: 64 px → 4 (the original CelebA run), 32 → 3, 128 → 5, 256 → 6."""
    side, scales = resolution, 1
    while side > _POOL_SIDE:
        side, scales = (side + 1) // 2, scales + 1
    return scales


def resnet_resolution_error(resolution: int) -> str | None:
    """Why this family cannot build `resolution`, or None when it can."""
    start, doublings = decoder_start(resolution)
    if not RESNET_MIN <= resolution <= RESNET_MAX or start > _MAX_START or doublings < 2:
        return (
            f"s0·2^k with s0 in (2, 3, 5, 7), k >= 2, from {RESNET_MIN} to {RESNET_MAX} "
            "(e.g. 28, 32, 64, 128, 256)"
        )
    return None


RESOLUTION_ERRORS: dict[str, Callable[[int], str | None]] = {
    "infogan": infogan_resolution_error, "wae": wae_resolution_error, "resnet": resnet_resolution_error}
