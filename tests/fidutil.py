"""Random FID Inception weights for tests (no real weights are ever downloaded)."""

from __future__ import annotations

import torch

from tsvae_dist.fid.inception import InceptionNet


def calibrated_inception_state(side: int = 64) -> dict[str, torch.Tensor]:
    """Random weights whose activations stay O(1) through all 94 conv layers.

    Random BN scales and shifts, then running statistics calibrated on one batch (momentum None
    makes them that batch's exact statistics), so that eval mode neither explodes nor dies out and
    features vary between images.
    """
    torch.manual_seed(0)
    net = InceptionNet()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.2)
            module.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    return {k: v.clone() for k, v in net.state_dict().items()}
