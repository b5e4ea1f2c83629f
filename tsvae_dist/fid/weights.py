"""Finding and verifying the converted TF Inception weights (a path or URL, hash-checked); torch-free.

The weights file is configured, never fetched from a built-in address: FID numbers are only
comparable with the exact graph of 2015-12-05, so the file's SHA-256 is always verified, either
against an explicit hash or, for the standard name `pt_inception-2015-12-05-6726825d.pth`,
against the `-<hex>` suffix of its name, which by the torch.hub naming rule is a prefix of the
file's SHA-256.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import urllib.parse
import urllib.request

from tsvae_dist import storage
from tsvae_dist.config import RunConfig
from tsvae_dist.errors import ConfigError

SETTING = "eval.inception_weights"  # the config key named in every error
HASH_SETTING = "eval.inception_sha256"  # the config key of the expected full SHA-256
STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
_HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub's rule, with at least 8 hex digits


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_url(weights: str) -> bool:
    return "://" in weights


def expected_sha256(weights: str, sha256: str | None) -> str:
    """The full hash, or the hash prefix from the file name, that the weights must match."""
    if sha256:
        sha = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ConfigError(f"{SETTING}: the expected SHA-256 ({HASH_SETTING}) '{sha256}' is not 64 hex")
        return sha
    name = posixpath.basename(urllib.parse.urlparse(weights).path if _is_url(weights) else weights)
    match = _HASH_SUFFIX.search(name)
    if match is None:
        raise ConfigError(
            f"{SETTING}: cannot verify '{weights}': its name has no '-<sha256 prefix>.' suffix (as in "
            f"{STANDARD_FILE}) and {HASH_SETTING} is not set; set it to the file's full SHA-256")
    return match.group(1)


def _check_hash(data: bytes, expected: str, source: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if not got.startswith(expected):
        shown = expected if len(expected) == 64 else expected + "..."
        raise ConfigError(
            f"{SETTING}: '{source}' has the wrong SHA-256: expected {shown}, got {got}; "
            f"point it at the converted TF Inception weights ({STANDARD_FILE})")


def _download(url: str) -> bytes:
    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        return storage.read_bytes(url)
    except (OSError, ValueError) as e:  # URLError and fsspec's FileNotFoundError are OSErrors
        raise ConfigError(f"{SETTING}: cannot download '{url}': {first_line(e)}") from e


def fetch_verified(weights: str, expected: str, cache_dir: str) -> bytes:
    """The verified bytes of `weights`; a URL is downloaded once into `cache_dir` (atomically)."""
    if not _is_url(weights):
        if not storage.exists(weights):
            raise ConfigError(f"{SETTING}: no file '{weights}'; set it to the path or URL of {STANDARD_FILE}")
        data = storage.read_bytes(weights)
        _check_hash(data, expected, weights)
        return data
    name = posixpath.basename(urllib.parse.urlparse(weights).path) or STANDARD_FILE
    cached = storage.join(cache_dir, name)
    if storage.exists(cached):
        data = storage.read_bytes(cached)
        if hashlib.sha256(data).hexdigest().startswith(expected):
            return data
        # A stale or foreign file under the same name: replace it with a fresh download below.
    data = _download(weights)
    _check_hash(data, expected, weights)  # verified before it is cached: the cache only holds good files
    storage.makedirs(cache_dir)
    storage.write_bytes_atomic(cached, data)
    return data


# ---------------------------------------------------------------------------------------------
# The configuration check before any job


def fid_unavailable_reason(cfg: RunConfig) -> str | None:
    """Why FID is not attempted under this config (None when it is)."""
    if cfg.eval.fid == "off":
        return "off (eval.fid=off)"
    if not cfg.eval.inception_weights:
        return (f"skipped: eval.inception_weights is not set; set it to the path or URL of {STANDARD_FILE} "
                "(and eval.fid=required to insist)")
    return None


def _local_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_fid_config(cfg: RunConfig) -> None:
    """Before any job: weights that are set must exist and match their SHA-256, under eval.fid=auto as under
    required (`auto` evaluates without FID only when none are set); `required` insists they are set.

    A local file is hashed here (a second, cheap read); a URL (also `file://`) is downloaded here, once,
    into eval.cache_dir, where the evaluation job finds it.
    """
    if cfg.eval.fid == "off":
        return
    weights = cfg.eval.inception_weights
    if not weights:
        if cfg.eval.fid == "required":
            raise ConfigError(f"eval.inception_weights: eval.fid=required but it is not set; set it to the path or "
                              f"URL of {STANDARD_FILE} (or eval.fid=auto to evaluate without FID)")
        return
    expected = expected_sha256(weights, cfg.eval.inception_sha256 or None)  # ConfigError naming the setting
    if _is_url(weights):
        fetch_verified(weights, expected, cfg.eval.cache_dir)
        return
    if not storage.exists(weights):
        raise ConfigError(f"eval.inception_weights: '{weights}' does not exist; set it to the path or URL of "
                          f"{STANDARD_FILE} (or leave it unset with eval.fid=auto to evaluate without FID)")
    got = _local_sha256(weights)
    if not got.startswith(expected):
        raise ConfigError(f"eval.inception_weights: '{weights}' has SHA-256 {got}, expected {expected}...; "
                          f"point it at {STANDARD_FILE} (or set eval.inception_sha256)")
