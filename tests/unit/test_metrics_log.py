"""`MetricsLog`: metrics.jsonl survives a resume exactly up to the checkpoint, on disk and on object stores.

On resume at step S the lines past S (work that is redone) are dropped and the others kept byte for
byte; locally each line is appended at once, on object stores the object is rewritten on `flush`.
Only rank 0 writes; TensorBoard only for local directories.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

import pytest

from tsvae_dist import storage
from tsvae_dist.errors import CheckpointError
from tsvae_dist.train.metrics import MetricsLog

# Lines as an earlier run (or a person) may have written them: irregular spacing and key order must
# survive a resume unchanged, so the kept part is compared byte for byte.
OLD_LINES = [
    '{"step": 10, "loss": 3.5, "lr": 0.001}',
    '{"loss":2.25,"step":20,"note":"caf\\u00e9"}',
    '{"step": 30, "loss": 1.0, "gamma": 0.5}',
    '{"step": 40, "loss": 0.75}',
    '{"step": 50, "loss": 0.5}',
]


def text(lines: list[str]) -> str:
    return "".join(ln + "\n" for ln in lines)


@pytest.fixture
def memory_dir():
    """A fresh memory:// directory (fsspec's process-wide memory store), removed afterwards."""
    url = f"memory://metrics-log-{uuid.uuid4().hex}/stage1"
    yield url
    storage.remove(url.rsplit("/", 1)[0])


@pytest.fixture(params=["local", "memory"])
def directory(request, tmp_path):
    """A stage directory: a local path (append + TensorBoard) or a memory:// URL (rewrite on flush)."""
    if request.param == "local":
        return str(tmp_path / "stage1")
    return request.getfixturevalue("memory_dir")


def seed_metrics(directory: str, lines: list[str] = OLD_LINES) -> str:
    """Write an existing metrics.jsonl (as a previous attempt left it) and return its URL."""
    url = storage.join(directory, "metrics.jsonl")
    storage.makedirs(directory)
    storage.write_text_atomic(url, text(lines))
    return url


@pytest.fixture
def logs():
    """MetricsLogs made by a test, closed afterwards (their TensorBoard writers run a thread)."""
    made: list[MetricsLog] = []

    def make(directory: str, resume_step: int, enabled: bool = True) -> MetricsLog:
        made.append(MetricsLog(storage.join(directory, "metrics.jsonl"), storage.join(directory, "tb"), resume_step,
                               enabled=enabled))
        return made[-1]

    yield make
    for log in made:
        if log.tb is not None:
            log.tb.close()


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize(("resume_step", "kept"), [(30, 3), (35, 3), (50, 5), (1000, 5), (0, 0), (10, 1)])
def test_resume_drops_lines_past_the_checkpoint_and_keeps_the_rest_byte_identical(
        directory, logs, resume_step, kept):
    """Lines with step <= S stay exactly as written (bytes, spacing, key order); lines past S are gone,
    in the stored file itself, right at construction."""
    url = seed_metrics(directory)
    log = logs(directory, resume_step)
    assert storage.read_bytes(url) == text(OLD_LINES[:kept]).encode()
    assert log.lines == OLD_LINES[:kept]


def test_resume_finds_step_wherever_it_is_in_the_line(directory, logs):
    """The step is read as JSON, not by position: a line with "step" after other keys is judged right."""
    url = seed_metrics(directory, ['{"loss": 1.0, "step": 25}', '{"loss": 9.0, "step": 26}'])
    logs(directory, 25)
    assert storage.read_text(url) == '{"loss": 1.0, "step": 25}\n'


def test_resume_drops_blank_lines(directory, logs):
    """Blank lines (a stray newline) are not metrics: dropped, the metrics lines around them kept."""
    url = seed_metrics(directory, [OLD_LINES[0], "", "   ", OLD_LINES[1], OLD_LINES[3]])
    logs(directory, 20)
    assert storage.read_text(url) == text(OLD_LINES[:2])


def test_resume_of_a_fresh_run_creates_nothing_until_written(directory, logs):
    """No metrics.jsonl yet (a first attempt): the constructor creates none."""
    logs(directory, 0)
    assert not storage.exists(storage.join(directory, "metrics.jsonl"))


def test_resume_after_a_torn_last_line(tmp_path, logs, caplog):
    """A local metrics.jsonl whose last line was cut mid-write: the resume drops it with a warning and goes on."""
    directory = str(tmp_path / "stage1")
    url = seed_metrics(directory, OLD_LINES[:2])
    with open(url, "a") as f:
        f.write('{"step": 30, "lo')
    with caplog.at_level(logging.WARNING, logger="tsvae_dist.train.metrics"):
        logs(directory, 20)
    assert storage.read_text(url) == text(OLD_LINES[:2])
    assert "line 3" in caplog.text and url in caplog.text


def test_resume_with_an_unparsable_middle_line_is_an_error(directory, logs):
    """An unparsable line before the last is no torn write: a CheckpointError naming the file and line,
    and the file is left as it was."""
    url = seed_metrics(directory, [OLD_LINES[0], '{"step": 20, "lo', OLD_LINES[2]])
    before = storage.read_bytes(url)
    with pytest.raises(CheckpointError, match=re.escape(url) + r": line 2\b"):
        logs(directory, 30)
    assert storage.read_bytes(url) == before


# ---------------------------------------------------------------------------------------------
# Writing after the resume


def test_local_write_appends_after_the_kept_lines_at_once(tmp_path, logs):
    """Locally each `write` is on disk immediately (no flush needed), after the kept lines, as JSON with
    the step first."""
    directory = str(tmp_path / "stage1")
    url = seed_metrics(directory)
    log = logs(directory, 30)
    log.write(31, {"loss": 0.9, "lr": 0.001})
    log.write(32, {"loss": 0.8, "lr": 0.001})
    written = storage.read_text(url)
    assert written.startswith(text(OLD_LINES[:3]))
    new = written[len(text(OLD_LINES[:3])):].splitlines()
    assert [json.loads(ln) for ln in new] == [{"step": 31, "loss": 0.9, "lr": 0.001},
                                              {"step": 32, "loss": 0.8, "lr": 0.001}]
    assert all(ln.startswith('{"step": ') for ln in new)


def test_object_store_write_waits_for_flush_then_rewrites_the_object(memory_dir, logs):
    """On an object store `write` only buffers; `flush` (with each checkpoint) rewrites the whole object
    as the kept lines followed by the new ones."""
    url = seed_metrics(memory_dir)
    log = logs(memory_dir, 20)
    log.write(21, {"loss": 0.9})
    assert storage.read_text(url) == text(OLD_LINES[:2])  # nothing uploaded yet
    log.flush()
    assert storage.read_text(url) == text(OLD_LINES[:2]) + '{"step": 21, "loss": 0.9}\n'
    log.write(22, {"loss": 0.8})
    log.close()
    assert storage.read_text(url) == text(OLD_LINES[:2] + ['{"step": 21, "loss": 0.9}', '{"step": 22, "loss": 0.8}'])


def test_object_store_first_run_creates_the_object_on_flush(memory_dir, logs):
    url = storage.join(memory_dir, "metrics.jsonl")
    log = logs(memory_dir, 0)
    log.write(1, {"loss": 2.0})
    assert not storage.exists(url)
    log.flush()
    assert storage.read_text(url) == '{"step": 1, "loss": 2.0}\n'


def test_local_first_run_into_a_new_directory(tmp_path, logs):
    """A first attempt whose stage directory does not exist yet can write its first line."""
    directory = str(tmp_path / "run" / "stage1")
    log = logs(directory, 0)
    log.write(1, {"loss": 2.0})
    assert storage.read_text(storage.join(directory, "metrics.jsonl")) == '{"step": 1, "loss": 2.0}\n'


def test_second_resume_sees_the_first_resumes_lines(directory, logs):
    """Resume, write, checkpoint, resume again from an earlier step: the file is cut at that step."""
    url = seed_metrics(directory)
    log = logs(directory, 30)
    log.write(31, {"loss": 0.9})
    log.write(32, {"loss": 0.8})
    log.close()
    logs(directory, 31)
    assert storage.read_text(url) == text(OLD_LINES[:3]) + '{"step": 31, "loss": 0.9}\n'


# ---------------------------------------------------------------------------------------------
# Disabled (ranks other than 0) and TensorBoard


def test_disabled_log_touches_nothing(directory, logs):
    """A non-main rank must not cut rank 0's file on resume, nor write, flush or create anything."""
    url = seed_metrics(directory)
    before = storage.read_bytes(url)
    log = logs(directory, 10, enabled=False)
    log.write(11, {"loss": 1.0})
    log.flush()
    log.close()
    assert storage.read_bytes(url) == before
    assert log.tb is None and log.lines == []
    assert storage.listdir(directory) == ["metrics.jsonl"]


def test_disabled_log_on_a_fresh_directory_creates_no_file(directory, logs):
    log = logs(directory, 0, enabled=False)
    log.write(1, {"loss": 1.0})
    log.close()
    assert not storage.exists(storage.join(directory, "metrics.jsonl"))


def test_tensorboard_writer_only_for_local_directories(tmp_path, memory_dir, logs):
    """Locally a SummaryWriter logs under <dir>/tb; on object stores there is none (TensorBoard cannot
    append to objects)."""
    local = str(tmp_path / "stage1")
    log = logs(local, 0)
    assert log.tb is not None
    assert log.tb.log_dir == storage.join(local, "tb")
    log.write(1, {"loss": 2.0})
    log.flush()
    assert (tmp_path / "stage1" / "tb").is_dir() and any((tmp_path / "stage1" / "tb").iterdir())
    assert logs(memory_dir, 0).tb is None


def test_tensorboard_purges_steps_past_the_resume(tmp_path, logs, monkeypatch):
    """The local writer is opened with purge_step = S + 1, so TensorBoard hides the redone steps."""
    import torch.utils.tensorboard as tensorboard

    opened: list[tuple[str, int | None]] = []
    real_writer = tensorboard.SummaryWriter

    def recording_writer(log_dir, purge_step=None, **kwargs):
        opened.append((log_dir, purge_step))
        return real_writer(log_dir, purge_step=purge_step, **kwargs)

    monkeypatch.setattr(tensorboard, "SummaryWriter", recording_writer)
    directory = str(tmp_path / "stage1")
    seed_metrics(directory)
    logs(directory, 30)
    assert opened == [(storage.join(directory, "tb"), 31)]
