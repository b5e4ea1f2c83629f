"""The one seam between the project and storage: every path is an fsspec URL.

Local paths and `file://` take a fast path through the OS (atomic rename); everything else goes
through fsspec. Writes are atomic everywhere: a reader sees either the old object or the whole new
one, never a partial upload.
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from typing import IO

import fsspec


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path components onto a URL or a local path."""
    if _is_local(url) and not url.startswith("file://"):
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def exists(url: str) -> bool:
    if _is_local(url):
        return os.path.exists(_local_path(url))
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # see objects another process has just written
    return fs.exists(path)


def makedirs(url: str) -> None:
    """Create a directory (a no-op on object stores, which have none)."""
    if _is_local(url):
        os.makedirs(_local_path(url), exist_ok=True)
    else:
        fs, path = filesystem(url)
        fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Names (not full URLs) of the entries directly under `url`; empty if it does not exist."""
    if _is_local(url):
        path = _local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def open_read(url: str) -> IO[bytes]:
    """Open `url` for binary reading."""
    if _is_local(url):
        return open(_local_path(url), "rb")
    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (one request on object stores: the fastest read there)."""
    if _is_local(url):
        with open(_local_path(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so that `url` holds either its old content or all of `data`, never a part.

    Locally: a temporary file in the same directory, fsync, then os.replace. On object stores: one
    PUT of the whole body, which the store commits atomically (no buffered writer that would commit a
    partial object when an exception unwinds through its `close()`).
    """
    if _is_local(url):
        path = _local_path(url)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def remove(url: str) -> None:
    """Delete `url` if it exists."""
    if _is_local(url):
        path = _local_path(url)
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
        return
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def torch_save_bytes(obj: object) -> bytes:
    """Serialise with torch.save into memory (then write atomically with one call)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
