"""A trained stage's model artifact: its weights (plain BatchNorm keys) and the config that made them.

Written once by the training stage that made it, read by encode, evaluate and generate; the path is
`RunLayout.model(stage)`.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch

from tsvae_dist import storage
from tsvae_dist.errors import CheckpointError
from tsvae_dist.models.build import build_stage1, build_stage2
from tsvae_dist.models.config import ModelConfig


def save_model(url: str, model: torch.nn.Module, config: dict[str, Any], stage: str, samples_seen: int) -> None:
    """Commit the weights of a trained `stage` model, with the run's resolved config, atomically."""
    body = {"model": model.state_dict(), "config": config, "stage": stage, "samples_seen": samples_seen}
    storage.write_bytes_atomic(url, storage.torch_save_bytes(body))


def load_model(url: str, stage: str, model_cfg: ModelConfig, channels: int, resolution: int,
               artifact: bytes | None = None) -> torch.nn.Module:
    """A trained stage model from its artifact at `url` (`artifact`: its bytes, if already read), in eval
    mode on the CPU, in the γ mode it was trained in (its state dict's keys say which).

    The modules are built on the meta device and take every tensor from the artifact: no time is
    spent on a random initialisation that would be overwritten (seconds for the large networks).
    """
    if artifact is None and not storage.exists(url):
        raise CheckpointError(f"{url}: no trained {stage} model; run the pipeline for this run_dir first "
                              "(python launch/submit.py run_dir=...)")
    data = artifact if artifact is not None else storage.read_bytes(url)
    body = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    gamma = "optimal" if "gamma_ema" in body["model"] else "learned"  # the artifact's γ mode sets its keys
    with torch.device("meta"):
        model = (build_stage1(model_cfg, channels, resolution, gamma=gamma) if stage == "stage1"
                 else build_stage2(model_cfg, gamma=gamma))
    try:
        model.load_state_dict(body["model"], assign=True)
    except RuntimeError as e:  # another architecture: name the settings that differ from the model's own
        saved = body.get("config") or {}
        ours = {**{f"model.{k}": v for k, v in dataclasses.asdict(model_cfg).items()},
                "dataset.channels": channels, "dataset.resolution": resolution}
        theirs = {**{f"model.{k}": v for k, v in (saved.get("model") or {}).items()},
                  **{f"dataset.{k}": (saved.get("dataset") or {}).get(k) for k in ("channels", "resolution")}}
        differ = [f"{k}={theirs[k]} (config: {v})" for k, v in ours.items() if k in theirs and theirs[k] != v]
        what = ", ".join(differ) if differ else str(e).splitlines()[0]
        raise CheckpointError(f"{url}: the {stage} model was trained with {what}; use the run's own "
                              "settings (its config.yaml)") from None
    empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise CheckpointError(f"{url}: no values for {empty[:3]} (not in the state dict)")
    return model.eval()
