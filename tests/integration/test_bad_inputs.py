"""The catalog of known bad inputs, each through the entry point a user meets it in (launch/submit.py,
`python -m shards`, `python -m tsvae_dist.generate`): exactly one line `error: ...` on stderr, no
traceback, and the project's exit code: 2 for a user error found before any job runs, 1 for a failure
inside a running stage job. Nothing is written to run_dir when the error comes before any job."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datautil import build_images
from tests.stagerun import REPO, env, tiny_overrides

WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line(proc: subprocess.CompletedProcess, pattern: str, code: int) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture
def tiny_data(tmp_path: Path) -> tuple[Path, list[str]]:
    """A built tiny synthetic dataset (8 train shards of 64, 2 test shards) and overrides naming it."""
    data = tmp_path / "data"
    build_images(str(data), train=512, test=128, per_shard=64, resolution=32)
    return data, tiny_overrides(data, tmp_path / "run")


def _wrong_weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights" / WEIGHTS
    path.parent.mkdir()
    path.write_bytes(b"these are not the Inception weights")
    return path


# Bad values found before any job: (name, overrides, the whole stderr line as a regex).
BEFORE_ANY_JOB = [
    ("unknown key added", ["+stage1.epoch=3"], r"error: stage1\.epoch: unknown setting; did you mean stage1\.epochs\?"),
    ("unknown key", ["stage1.epoch=3"], r"error: stage1\.epoch: unknown setting; did you mean stage1\.epochs\?"),
    ("unknown nested key", ["+stage1.loader.max_skiped_samples=3"],
     r"error: stage1\.loader\.max_skiped_samples: unknown setting; did you mean stage1\.loader\.max_skipped_samples\?"),
    ("unknown group option", ["dataset=nope"],
     r"error: dataset=nope: no such option in conf/dataset/; one of celeba128, .*, synthetic"),
    ("wrong type", ["stage1.epochs=abc"], r"error: stage1\.epochs: Value 'abc' of type 'str' could not be .*"),
    ("override without a value", ["stage1.epochs"], r"error: Error parsing override 'stage1\.epochs': .*"),
    ("bad value", ["stage1.batch_size=63"], r"error: stage1\.batch_size: 63 is not divisible by the world size 2 .*"),
    ("run_dir in /proc", ["run_dir=/proc/tsvae-x"], r"error: run_dir: cannot create or write '/proc/tsvae-x': .*"),
    ("fid required without weights", ["eval.fid=required"],
     r"error: eval\.inception_weights: eval\.fid=required but it is not set; .*"),
    ("fid auto with missing weights", [f"eval.inception_weights=/nonexistent/{WEIGHTS}"],
     rf"error: eval\.inception_weights: '/nonexistent/{WEIGHTS}' does not exist; .*"),
    ("fid weights at an unreachable URL", ["eval.fid=required", f"eval.inception_weights=http://127.0.0.1:9/{WEIGHTS}"],
     rf"error: eval\.inception_weights: cannot download 'http://127\.0\.0\.1:9/{WEIGHTS}': .*"),
]


@pytest.mark.parametrize("action", ["run", "dry_run"])
@pytest.mark.parametrize(("name", "overrides", "pattern"), BEFORE_ANY_JOB, ids=[c[0] for c in BEFORE_ANY_JOB])
def test_bad_config_is_one_line_exit_2_before_any_job(tmp_path, name, overrides, pattern, action) -> None:
    run_dir = tmp_path / "run"
    proc = _run(["launch/submit.py", *tiny_overrides(tmp_path / "data", run_dir), *overrides, f"action={action}"])
    _assert_one_line(proc, pattern, 2)
    assert not run_dir.exists() and not (tmp_path / "data").exists()


def test_run_dir_under_a_regular_file(tmp_path) -> None:
    (tmp_path / "afile").write_text("x")
    for action in ("run", "dry_run"):
        proc = _run(["launch/submit.py", *tiny_overrides(tmp_path / "data", tmp_path / "afile" / "run"),
                     f"action={action}"])
        _assert_one_line(proc, rf"error: run_dir: cannot create or write '{tmp_path}/afile/run': "
                               rf"{tmp_path}/afile is a file, not a directory", 2)


@pytest.mark.parametrize("fid", ["required", "auto"])
def test_wrong_weights_by_url_are_refused_before_any_job(tmp_path, fid) -> None:
    """A `file://` URL is downloaded (into eval.cache_dir) and hash-checked before submission; under
    eval.fid=auto too, because weights that are set but wrong are an error, not a reason to skip FID."""
    url = _wrong_weights(tmp_path).as_uri()
    run_dir = tmp_path / "run"
    proc = _run(["launch/submit.py", *tiny_overrides(tmp_path / "data", run_dir), f"eval.fid={fid}",
                 f"eval.inception_weights={url}", f"eval.cache_dir={tmp_path / 'cache'}"])
    _assert_one_line(proc, rf"error: eval\.inception_weights: '{re.escape(url)}' has the wrong SHA-256: .*", 2)
    assert not run_dir.exists()
    assert not (tmp_path / "cache" / WEIGHTS).exists()  # the cache only ever holds verified files


def test_wrong_local_weights_under_fid_auto_are_an_error(tmp_path) -> None:
    path = _wrong_weights(tmp_path)
    proc = _run(["launch/submit.py", *tiny_overrides(tmp_path / "data", tmp_path / "run"),
                 f"eval.inception_weights={path}"])
    _assert_one_line(proc, rf"error: eval\.inception_weights: '{re.escape(str(path))}' has SHA-256 .*", 2)


def test_more_streams_than_shards_is_refused_before_any_job(tmp_path) -> None:
    data = tmp_path / "data"
    build_images(str(data), train=128, test=64, per_shard=64, resolution=32)  # 2 train shards
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data, run_dir, **{"dataset.synthetic_train": 128, "dataset.synthetic_test": 64,
                                                 "stage1.loader.streams": 4})
    for action in ("run", "dry_run"):
        proc = _run(["launch/submit.py", *overrides, f"action={action}"])
        _assert_one_line(proc, r"error: stage1\.loader\.streams: 4 streams but split 'train' of .* has only 2 "
                               r"shards; .*", 2)
        assert not run_dir.exists()


def test_a_bad_shard_in_a_stage_job_is_one_line_naming_it_exit_1(tiny_data) -> None:
    """The rank that meets the bad shard raises DataError; the other loses its peer (gloo). The launcher
    prints the cause, from the rank that raised it, with that rank's log, and no traceback."""
    data, overrides = tiny_data
    (data / "train" / "shard-000003.tar").write_bytes(b"not a tar")
    proc = _run(["launch/submit.py", *overrides, "stage1.epochs=1"])
    line = _assert_one_line(
        proc, r"error: stage1: rank \d: DataError: .*train/shard-000003\.tar.* \(log: .*_log\.err\)", 1)
    log = Path(line.rsplit("(log: ", 1)[1][:-1])
    assert "error: stage1: rank" in log.read_text()  # our error's own line in the task's log
    assert "stage1: running as local job" in proc.stdout


def test_shards_builder_bad_input_is_one_line_exit_2(tmp_path) -> None:
    src = tmp_path / "images"
    src.mkdir()
    (src / "bad.png").write_bytes(b"not an image")
    proc = _run(["-m", "shards", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--resolution", "8"])
    _assert_one_line(proc, r"error: .*bad\.png: undecodable image \(UnidentifiedImageError: cannot identify image "
                           r"file 'bad\.png'\)", 2)
    proc = _run(["-m", "shards", "verify", str(tmp_path / "nowhere")])
    _assert_one_line(proc, rf"error: .*{tmp_path}/nowhere.*", 2)


def test_generate_bad_inputs(tmp_path) -> None:
    proc = _run(["-m", "tsvae_dist.generate", f"run_dir={tmp_path / 'run'}", "+generate.nmu=3"])
    _assert_one_line(proc, r"error: generate\.nmu: unknown setting; did you mean generate\.num\?", 2)
    proc = _run(["-m", "tsvae_dist.generate", f"run_dir={tmp_path / 'run'}"])
    _assert_one_line(proc, rf"error: generate: {tmp_path}/run/stage1/model\.pt: no trained stage1 model; .*", 1)
