"""The one seam between the project and storage: every path is an fsspec URL.

Local paths and `file://` take a fast path through the OS (atomic rename); everything else goes
through fsspec. Writes are atomic everywhere: a reader sees either the old object or the whole new
one, never a partial upload.

Object stores are reached with bounded patience. Every remote call is one attempt with short
timeouts (s3fs and botocore retries switched off: nested, they kept a read retrying for 14 minutes
against a hung server); this module retries the whole call with backoff for `TSVAE_STORAGE_RETRY_S`
seconds, then raises `StorageError` naming the URL. A short outage is waited out with nothing lost
(a shard is read whole or not at all); a persistent one fails the job within about a minute.

Configuration, from the environment (child processes inherit it):
- credentials: the standard AWS chain (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_SESSION_TOKEN`, `AWS_PROFILE`, instance roles), `AWS_DEFAULT_REGION`;
- endpoint of an S3-compatible server: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (the names
  boto3 and the aws CLI read too), else fsspec's `FSSPEC_S3_ENDPOINT_URL`; none means AWS itself;
- `TSVAE_STORAGE_RETRY_S` (default 45): how long a failing remote call is retried;
- `TSVAE_STORAGE_TIMEOUT_S` (default 10): connect and read timeout of one remote request; an upload
  may take that plus 1 s per 4 MiB;
- `TSVAE_S3_DIRECT_GET` (default 1): whole-object reads from a plain-`http://` S3 endpoint go
  through `s3_direct` (one signed GET, the body received without holding the GIL: what lets a
  shard download overlap the decoding of the previous one); 0 sends them through s3fs too.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import fsspec
import fsspec.asyn

from tsvae_dist.storage import s3_direct

log = logging.getLogger(__name__)

RETRY_ENV = "TSVAE_STORAGE_RETRY_S"
TIMEOUT_ENV = "TSVAE_STORAGE_TIMEOUT_S"
DEFAULT_RETRY_S = 45.0
DEFAULT_TIMEOUT_S = 10.0
_MAX_BACKOFF_S = 4.0
MIN_UPLOAD_BYTES_PER_S = 4 << 20  # an upload slower than this on average counts as failed (and is retried)
# Errors that retrying cannot fix: raised at once (a missing shard is a DataError upstream, not an outage).
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
              s3_direct.RequestRefused)

T = TypeVar("T")


class StorageError(OSError):
    """A store kept failing for the whole retry window; the message names the URL and the last error."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {raw!r}")
    return value


def retry_window_s() -> float:
    """Seconds a failing remote call is retried before StorageError (`TSVAE_STORAGE_RETRY_S`)."""
    return _env_seconds(RETRY_ENV, DEFAULT_RETRY_S)


def request_timeout_s() -> float:
    """Connect and read timeout of one remote request (`TSVAE_STORAGE_TIMEOUT_S`)."""
    return _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (None: AWS's own)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return fsspec.config.conf.get("s3", {}).get("endpoint_url")


@functools.lru_cache(maxsize=1)
def _bounded_s3_class() -> type:
    import s3fs

    class BoundedS3FileSystem(s3fs.S3FileSystem):
        """s3fs making one attempt per call: `_retrying` owns the retry policy."""

        retries = 1

    return BoundedS3FileSystem


def s3_options() -> dict:
    """The s3fs keyword arguments this module uses: endpoint from the environment, bounded timeouts."""
    timeout = request_timeout_s()
    options: dict = {
        "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                          "retries": {"total_max_attempts": 1, "mode": "standard"}},
        "max_concurrency": 1,  # a whole-object read is one GET (no HEAD first, no ranged parts)
    }
    endpoint = s3_endpoint()
    if endpoint:
        options["endpoint_url"] = endpoint
    return fsspec.config.apply_config(_bounded_s3_class(), options)


_AT_FORK: list = []  # the cached filesystems of the process, as of its last fork


def _hold_filesystems_across_fork() -> None:
    """Before a fork (a DataLoader worker), reference every cached filesystem from a plain list.

    fsspec empties its instance caches in the child; an s3fs instance freed there runs its finalizer
    against the parent's event loop, which does not exist in the child, and every worker prints an
    asyncio traceback. Held by this list, the child's copies are never freed (nor used). In the
    parent the list only duplicates references the caches hold anyway.
    """
    held, todo = [], [fsspec.AbstractFileSystem]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        held.extend(getattr(cls, "_cache", {}).values())
    _AT_FORK[:] = held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_hold_filesystems_across_fork)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `url` (bounded timeouts for s3 and http) and the path inside it.

    Instances are fsspec's, cached per process and settings (a forked worker gets its own).
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        fs = _bounded_s3_class()(**s3_options())
        return fs, fs._strip_protocol(url)
    if protocol in ("http", "https"):
        import aiohttp

        timeout = request_timeout_s()
        client_kwargs = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}
        return fsspec.filesystem(protocol, client_kwargs=client_kwargs), url
    return fsspec.core.url_to_fs(url)


def _transient(exc: BaseException) -> bool:
    """Whether `exc` may go away by itself (an outage, a timeout, a 5xx), so the call is worth repeating."""
    if isinstance(exc, (StorageError, *_PERMANENT)):  # a StorageError has had its retries already
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):  # s3fs maps 5xx/SlowDown to plain OSError
        return True
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    try:
        from botocore import exceptions as bx

        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.ResponseStreamingError)):
            return True
    except ImportError:
        pass
    return False


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (timed out)"


def _retrying(url: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, repeated with backoff on transient errors for up to the retry window; then StorageError."""
    window = retry_window_s()
    start = time.monotonic()
    delay, attempts = 0.25, 0
    while True:
        try:
            return call()
        except Exception as e:
            if not _transient(e):
                raise
            attempts += 1
            elapsed = time.monotonic() - start
            if elapsed >= window:
                raise StorageError(f"{url}: {what} failed for {elapsed:.0f} s ({attempts} attempts; "
                                   f"{RETRY_ENV}={window:g}): {_describe(e)}") from e
            pause = min(delay, window - elapsed)
            log.warning("%s: %s failed (%s); retrying in %.2f s", url, what, _describe(e), pause)
            time.sleep(pause)
            delay = min(delay * 2, _MAX_BACKOFF_S)


def join(url: str, *parts: str) -> str:
    """Join path components onto a URL or a local path."""
    if _is_local(url) and not url.startswith("file://"):
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def exists(url: str) -> bool:
    """Whether `url` exists; on object stores always asked afresh (another process may just have written it)."""
    if _is_local(url):
        return os.path.exists(_local_path(url))
    fs, path = filesystem(url)

    def ask() -> bool:
        fs.invalidate_cache(path)
        try:
            fs.info(path)  # not fs.exists: s3fs answers False for "the server is down" too
        except FileNotFoundError:
            return False
        return True

    return _retrying(url, "existence check", ask)


def makedirs(url: str) -> None:
    """Create a directory (a no-op on object stores, which have none)."""
    if _is_local(url):
        os.makedirs(_local_path(url), exist_ok=True)
    elif not url.startswith(("s3://", "s3a://", "gs://", "gcs://")):
        fs, path = filesystem(url)
        fs.makedirs(path, exist_ok=True)


def unwritable_reason(url: str) -> str | None:
    """Why a directory cannot be created or written at a local `url` (None: it can; object stores are
    not probed). Leaves nothing behind: the probe file in the nearest existing ancestor is removed."""
    if not _is_local(url):
        return None
    path = os.path.abspath(_local_path(url))
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{ancestor} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".tsvae-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in {ancestor}: {e.strerror or e}"
    return None


def listdir(url: str) -> list[str]:
    """Names (not full URLs) of the entries directly under `url`; empty if it does not exist.

    On object stores the listing is always fresh (never fsspec's cache): it sees what another process
    has just written.
    """
    if _is_local(url):
        path = _local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(url)

    def ls() -> list[str]:
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    return _retrying(url, "listing", ls)


def open_read(url: str) -> IO[bytes]:
    """Open `url` for binary reading (remote objects are read whole, with retries, into memory)."""
    if _is_local(url):
        return open(_local_path(url), "rb")
    return io.BytesIO(read_bytes(url))


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (one request on object stores: the fastest read there), with retries."""
    if _is_local(url):
        with open(_local_path(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url)
    if isinstance(fs, _bounded_s3_class()):
        direct = s3_direct.getter(s3_options())
        bucket, _, key = path.partition("/")
        if direct is not None and key:
            timeout = request_timeout_s()
            try:
                return _retrying(url, "read", lambda: direct.get(url, bucket, key, timeout))
            except s3_direct.Unsupported as e:  # not expected of S3 servers; s3fs reads anything
                log.debug("%s; reading through s3fs", e)
    return _retrying(url, "read", lambda: fs.cat_file(path))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so that `url` holds either its old content or all of `data`, never a part.

    Locally: a temporary file in the same directory, fsync, then os.replace. On object stores: one
    PUT of the whole body (a multipart upload above 100 MB, which the store commits only when
    complete and s3fs aborts on error), retried as a whole; never fsspec's buffered writer, whose
    `close()` commits a partial object when an exception unwinds through its `with` block.
    """
    if _is_local(url):
        with atomic_writer(url) as f:
            f.write(data)
        return
    fs, path = filesystem(url)
    data = bytes(data)
    if getattr(fs, "async_impl", False):
        # Socket timeouts bound waiting for a reply, not sending: against a hung server an upload larger
        # than the socket buffers blocks forever. So each attempt has a deadline, after which it is
        # cancelled (an unfinished PUT or multipart upload commits nothing).
        deadline = request_timeout_s() + len(data) / MIN_UPLOAD_BYTES_PER_S
        _retrying(url, "write", lambda: fsspec.asyn.sync(fs.loop, fs._pipe_file, path, data, timeout=deadline))
    else:
        _retrying(url, "write", lambda: fs.pipe_file(path, data))


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[IO[bytes]]:
    """A binary file to write `url` through, committed only if the block ends without an exception.

    Locally it is a temporary file in the target's directory, renamed over the target at the end;
    remotely a memory buffer uploaded by `write_bytes_atomic`. On error nothing is committed and the
    old content (if any) stays.
    """
    if not _is_local(url):
        buf = io.BytesIO()
        yield buf
        write_bytes_atomic(url, buf.getvalue())
        return
    path = _local_path(url)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def remove(url: str) -> None:
    """Delete `url` (a file, or a directory/prefix with everything under it) if it exists."""
    if _is_local(url):
        path = _local_path(url)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
        return
    fs, path = filesystem(url)

    def rm() -> None:
        fs.invalidate_cache(path)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    _retrying(url, "delete", rm)


def torch_save_bytes(obj: object) -> bytes:
    """Serialise with torch.save into memory (then write atomically with one call)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# webdataset: an fsspec opener for pipelines built with webdataset itself

WDS_SCHEMES = ("s3", "s3a", "gs", "gcs", "memory")


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: object) -> IO[bytes]:
    """A webdataset `gopen` handler: the whole object, read through this module (bounded retries)."""
    if mode != "rb":
        raise ValueError(f"{url}: the fsspec opener only reads (mode 'rb'), got mode {mode!r}")
    return io.BytesIO(read_bytes(url))


def register_webdataset_opener(schemes: tuple[str, ...] = WDS_SCHEMES) -> list[str]:
    """Make webdataset open `schemes` URLs (s3://, gs://, ...) through this module; returns those registered.

    webdataset 1.0.2 has no fsspec or s3 scheme of its own. The table is per process: call this in
    every DataLoader worker too (`webdataset_worker_init` as `worker_init_fn`), since spawned workers
    start with webdataset's defaults. Schemes whose fsspec implementation is not installed are skipped.
    """
    import sys

    try:
        import webdataset  # noqa: F401  (loads webdataset.gopen)
    except ImportError as e:
        raise ImportError("register_webdataset_opener needs webdataset: pip install 'tsvae-dist[webdataset]' "
                          "(or webdataset==1.0.2)") from e

    table = sys.modules["webdataset.gopen"].gopen_schemes
    registered = []
    for scheme in schemes:
        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError):
            continue
        table[scheme] = gopen_fsspec
        registered.append(scheme)
    return registered


def webdataset_worker_init(worker_id: int) -> None:
    """`worker_init_fn` for DataLoaders over webdataset pipelines: registers the fsspec opener."""
    register_webdataset_opener()
