"""Shared pytest fixtures: the local Slurm cluster and S3 server (started on first use)."""

from tests.cluster import s3_env, slurm_env  # noqa: F401  (pytest fixtures)
