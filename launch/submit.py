"""Run the Two-Stage VAE pipeline: `python launch/submit.py [cluster=slurm nodes=4 dataset=celeba128 ...]`.

Composes conf/ with hydra, validates everything before any job starts, then runs (cluster=local)
or submits (cluster=slurm) stage 1 -> encode -> stage 2 -> evaluate as dependent jobs. The last
line printed is `report: <URL of report.json>`. `action=dry_run` shows what would run;
`action=status` / `action=cancel` act on the run in run_dir (read from its saved config.yaml);
`--cfg job` prints the composed config.

Errors are one line, `error: <what>: <why>`. Exit code 2: a user error found before any job runs
(configuration, data, weights, run_dir); 1: a stage job failed (or the cluster/storage did).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python launch/submit.py [--cfg job] [--help] [KEY=VALUE | GROUP=OPTION | +KEY=VALUE ...]

Config groups (conf/): cluster, dataset, model, stage1, stage2, eval; every key is documented in
tsvae_dist/config.py. Examples:
  python launch/submit.py dataset=mnist dataset.root=s3://bucket/mnist
  python launch/submit.py cluster=slurm nodes=4 dataset=celeba128 action=status
  python launch/submit.py action=dry_run
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    show_cfg = None
    for flag in ("--cfg", "-c"):
        if flag in args:
            i = args.index(flag)
            show_cfg = args[i + 1] if i + 1 < len(args) else "job"
            del args[i:i + 2]

    from tsvae_dist import cli
    from tsvae_dist.errors import CheckpointError, ConfigError, DataError
    from tsvae_dist.pipeline.follow import StageFailed
    from tsvae_dist.pipeline.slurm import SlurmError
    from tsvae_dist.storage import StorageError

    try:
        if show_cfg is not None:
            from omegaconf import OmegaConf

            if show_cfg not in ("job", "all"):
                raise ConfigError(f"--cfg: {show_cfg!r} is not job|all")
            print(OmegaConf.to_yaml(cli.compose_raw(args)), end="")
            return 0
        cfg = cli.compose(args)
        if cfg.action in ("status", "cancel"):
            from tsvae_dist.pipeline.launcher import status

            status(cli.compose_for_run(args, cfg))  # the run's own config.yaml, this command's overrides on top
            return 0
        from tsvae_dist.pipeline.launcher import launch

        report = launch(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageFailed, SlurmError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
