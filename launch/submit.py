"""Run the Two-Stage VAE pipeline: `python launch/submit.py [cluster=slurm nodes=4 dataset=celeba128 ...]`.

Composes conf/ with hydra, validates everything before any job starts, then runs (cluster=local)
or submits (cluster=slurm) stage 1 → encode → stage 2 → evaluate as dependent jobs. The last
line printed is `report: <URL of report.json>`. `action=dry_run` shows what would run;
`--cfg job` prints the composed config.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from tsvae_dist import config as config_lib
from tsvae_dist.errors import CheckpointError, ConfigError, DataError

config_lib.register()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(composed: DictConfig) -> None:
    from tsvae_dist.fid.weights import check_fid_config
    from tsvae_dist.pipeline.follow import StageFailed
    from tsvae_dist.pipeline.launcher import launch, status
    from tsvae_dist.pipeline.slurm import SlurmError
    from tsvae_dist.storage import StorageError

    try:
        cfg = config_lib.from_container(composed)
        config_lib.validate(cfg)
        check_fid_config(cfg)
        if cfg.action in ("status", "cancel"):
            status(cfg)
            return
        report = launch(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (StageFailed, SlurmError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
