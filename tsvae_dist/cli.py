"""Run one job from the command line: `python -m tsvae_dist.<stage> [hydra overrides]`.

Works as a plain process, under `torchrun --nproc_per_node=N` and under `srun`: the same config
composition as `launch/submit.py`, then the stage's `run(cfg)` in this process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tsvae_dist import config as config_lib
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import CheckpointError, ConfigError, DataError
from tsvae_dist.runtime.log import setup_logging
from tsvae_dist.storage import StorageError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> RunConfig:
    """Compose conf/ with hydra overrides into a validated, typed RunConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_lib.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = hydra_compose(config_name=config_name, overrides=list(overrides))
    cfg = config_lib.from_container(composed)
    config_lib.validate(cfg)
    return cfg


def main(run: Callable[[RunConfig], Any], argv: Sequence[str] | None = None) -> None:
    setup_logging()
    try:
        cfg = compose(sys.argv[1:] if argv is None else argv)
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("RANK", "0") == "0":
        print(result)
