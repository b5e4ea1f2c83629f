"""Shared pytest set-up: the test layers as markers, and the local Slurm cluster and S3 server fixtures.

`tests/unit/` holds fast in-process tests (marker `unit`); `tests/integration/` holds tests that start
processes (subprocesses, torchrun, mp.spawn), the local Slurm cluster or the S3 server (marker
`integration`, plus `slurm`/`s3`). A test in `unit/` that starts processes is marked `integration`
itself. `make test` runs both; `make test-unit` only the first. What the session started of the
local cluster it stops at the end (tests/cluster.py).
"""

from pathlib import Path

import pytest

from tests.cluster import s3_env, slurm_env, stop_started  # noqa: F401  (pytest fixtures)

_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        starts_processes = (_INTEGRATION_DIR in Path(item.path).resolve().parents
                            or any(item.get_closest_marker(m) for m in ("integration", "slurm", "s3")))
        item.add_marker(pytest.mark.integration if starts_processes else pytest.mark.unit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_started()
