"""The local Slurm cluster and S3 server (launch/dev_cluster.sh) as pytest fixtures.

Import the fixtures in tests/conftest.py::

    from tests.cluster import s3_env, slurm_env  # noqa: F401  (pytest fixtures)

`slurm_env` also puts SLURM_CONF into os.environ for the session, so that sbatch/sacct/scontrol/squeue
run by submitit (which inherit os.environ) reach the test cluster. `s3_env` changes nothing global:
AWS_ENDPOINT_URL in os.environ would redirect every boto client of the session (moto-based tests
included) to the local server. Pass `s3_storage_options(env)` to fsspec/s3fs, or `env` to a subprocess.

When the cluster cannot come up, the fixtures fail with the script's output; they never skip
(CI installs the packages first with launch/install_cluster_deps.sh).

What a test session starts it stops at the end (`stop_started`, from tests/conftest.py), so that
`make test` leaves no daemons holding the cluster's ports (another checkout's tests need them). A
cluster that was already running (`make cluster-up`) is left running, and so is everything with
TSVAE_KEEP_DEV_CLUSTER=1 (quicker reruns: the next session finds it up).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO / "launch" / "dev_cluster.sh"
# From nothing the cluster is up in ~20 s; allow for a slow, loaded machine.
UP_TIMEOUT_S = 300

_started: dict[tuple[bool, bool], dict[str, str]] = {}
_to_stop: list[list[str]] = []  # the selection flags of what this process brought up from stopped


def _flags(slurm: bool, s3: bool) -> list[str]:
    return ([] if slurm else ["--no-slurm"]) + ([] if s3 else ["--no-s3"])


def _running(flags: list[str]) -> bool:
    """Whether any daemon of the selection runs already (`dev_cluster.sh status` exits 0)."""
    proc = subprocess.run(["bash", str(DEV_CLUSTER), "status", *flags], capture_output=True, cwd=REPO)
    return proc.returncode == 0


class DevClusterError(RuntimeError):
    """launch/dev_cluster.sh up failed; the message carries its output."""


def parse_exports(text: str) -> dict[str, str]:
    """The variables of the `export NAME=value` lines in `text` (comments and other lines ignored)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


def ensure_dev_cluster(slurm: bool = True, s3: bool = True) -> dict[str, str]:
    """Bring up the local cluster (once per process and selection) and return its environment.

    The returned dict holds what `dev_cluster.sh up` prints: SLURM_CONF when Slurm is up;
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL,
    FSSPEC_S3_ENDPOINT_URL, TSVAE_S3_ENDPOINT_URL, TSVAE_S3_BUCKET when S3 is up.
    Raises DevClusterError with the script's output when it fails.
    """
    key = (slurm, s3)
    if key not in _started:
        flags = _flags(slurm, s3)
        cmd = ["bash", str(DEV_CLUSTER), "up", *flags]
        if not _running(flags):
            _to_stop.append(flags)  # even if `up` fails half-way: stop what it did start
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=UP_TIMEOUT_S, cwd=REPO)
        except subprocess.TimeoutExpired as e:
            raise DevClusterError(
                f"{' '.join(cmd)} did not finish in {UP_TIMEOUT_S} s\n{e.stdout or ''}\n{e.stderr or ''}"
            ) from e
        if proc.returncode != 0:
            raise DevClusterError(
                f"{' '.join(cmd)} failed (exit {proc.returncode}); did launch/install_cluster_deps.sh run?\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        env = parse_exports(proc.stdout)
        wanted = (["SLURM_CONF"] if slurm else []) + (["AWS_ENDPOINT_URL", "TSVAE_S3_BUCKET"] if s3 else [])
        missing = [name for name in wanted if name not in env]
        if missing:
            raise DevClusterError(f"{' '.join(cmd)} printed no {', '.join(missing)}:\n{proc.stdout}\n{proc.stderr}")
        _started[key] = env
    return dict(_started[key])


def stop_started() -> None:
    """`dev_cluster.sh down` for what this process started (unless TSVAE_KEEP_DEV_CLUSTER is set)."""
    if os.environ.get("TSVAE_KEEP_DEV_CLUSTER"):
        return
    while _to_stop:
        subprocess.run(["bash", str(DEV_CLUSTER), "down", *_to_stop.pop()], capture_output=True, cwd=REPO,
                       timeout=UP_TIMEOUT_S)
    _started.clear()


def s3_storage_options(env: dict[str, str]) -> dict:
    """fsspec/s3fs keyword arguments for the local S3 server described by `env` (from `s3_env`)."""
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"]},
    }


def _ensure_or_fail(slurm: bool, s3: bool) -> dict[str, str]:
    try:
        return ensure_dev_cluster(slurm=slurm, s3=s3)
    except DevClusterError as e:
        failure = str(e)
    pytest.fail(failure, pytrace=False)  # outside `except`: the script's output, not a traceback chain


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The local Slurm cluster's environment (SLURM_CONF); also set in os.environ for the session."""
    env = _ensure_or_fail(slurm=True, s3=False)
    slurm_only = {"SLURM_CONF": env["SLURM_CONF"]}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in slurm_only.items():
            mp.setenv(name, value)
        yield slurm_only


@pytest.fixture(scope="session")
def s3_env() -> dict[str, str]:
    """The local S3 server's environment: credentials, endpoint URL, bucket (os.environ untouched)."""
    env = _ensure_or_fail(slurm=False, s3=True)
    return {name: value for name, value in env.items() if name.startswith(("AWS_", "FSSPEC_S3_", "TSVAE_S3_"))}


def subprocess_env(*envs: dict[str, str]) -> dict[str, str]:
    """os.environ updated with the given cluster environments, for a child process."""
    merged = dict(os.environ)
    for env in envs:
        merged.update(env)
    return merged
