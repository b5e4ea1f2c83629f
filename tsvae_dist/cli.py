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

import yaml

from tsvae_dist import config as config_lib
from tsvae_dist import storage
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import CheckpointError, ConfigError, DataError
from tsvae_dist.runtime.log import setup_logging
from tsvae_dist.storage import StorageError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def hydra_error(e: Exception) -> ConfigError:
    """A hydra/OmegaConf composition error as one line naming the override or setting at fault."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return config_lib.unknown_key_error(str(cause.full_key))
    if cause is not None and getattr(cause, "full_key", None):  # a ValidationError: wrong type or value
        return ConfigError(f"{cause.full_key}: {str(cause).splitlines()[0]}")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group, _, option = str(getattr(e, "missing_cfg_file", "") or "").partition("/")
        what = f"{group}={option}: no such option in conf/{group}/" if option else lines[0]
        return ConfigError(f"{what}; one of {', '.join(e.options)}")
    if isinstance(e, OverrideParseException):
        return ConfigError(": ".join(ln for ln in lines if not ln.startswith("See https://")))
    return ConfigError(lines[0] if lines else type(e).__name__)


def compose_raw(overrides: Sequence[str] = (), config_name: str = "config") -> Any:
    """conf/ composed with hydra overrides, as a DictConfig; a composition error is a ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_lib.register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise hydra_error(e) from e


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> RunConfig:
    """Compose conf/ with hydra overrides into a validated, typed RunConfig."""
    cfg = config_lib.from_container(compose_raw(overrides, config_name))
    config_lib.validate(cfg)
    return cfg


def _explicit_keys(overrides: Sequence[str], composed: dict[str, Any]) -> set[str]:
    """The flattened keys a command sets: those its overrides name, and those its group choices
    (`dataset=mnist`) change from the defaults."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    named = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
    defaults = config_lib.flatten(config_lib.to_container(config_lib.from_container(compose_raw())))
    keys = {k for k, v in composed.items() if defaults.get(k, object()) != v}
    for name in named:
        keys |= {k for k in composed if k == name or k.startswith(name + ".")}
    return keys


def compose_for_run(overrides: Sequence[str], cfg: RunConfig | None = None) -> RunConfig:
    """The config of the run in run_dir, for a tool acting on an existing run (generate, a stage, status,
    cancel): the run's saved config.yaml with the keys this command sets explicitly on top; the
    command's own config when the run has none yet."""
    cfg = cfg or compose(overrides)
    url = cfg.layout.config
    if not storage.exists(url):
        return cfg
    saved = yaml.safe_load(storage.read_text(url))
    composed = config_lib.flatten(config_lib.to_container(cfg))
    merged = config_lib.flatten(saved)
    for key in _explicit_keys(overrides, composed):
        merged[key] = composed[key]
    try:
        run_cfg = config_lib.from_container(config_lib.unflatten(merged))
    except ConfigError as e:
        raise ConfigError(f"{url}: {e}") from None
    config_lib.validate(run_cfg)
    return run_cfg


def main(run: Callable[[RunConfig], Any], argv: Sequence[str] | None = None) -> None:
    """Compose (the run's saved config under this command's overrides), run; errors are one line.

    Exit code 2: the configuration is wrong (nothing ran); 1: the job failed while running.
    """
    setup_logging()
    job = run.__module__.rsplit(".", 1)[-1]
    try:
        cfg = compose_for_run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError, CheckpointError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError, StorageError) as e:
        print(f"error: {job}: {e}", file=sys.stderr)
        sys.exit(1)
    if os.environ.get("RANK", "0") == "0":
        print(result)
