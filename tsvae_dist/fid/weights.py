"""Loading the converted TF Inception weights from a path or URL, hash-checked.

The weights file is configured, never fetched from a built-in address: FID numbers are only
comparable with the exact graph of 2015-12-05, so the file's SHA-256 is always verified, either
against an explicit hash or, for the standard name `pt_inception-2015-12-05-6726825d.pth`,
against the `-<hex>` suffix of its name, which by the torch.hub naming rule is a prefix of the
file's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import urllib.parse
import urllib.request

import torch

from tsvae_dist import storage
from tsvae_dist.errors import ConfigError
from tsvae_dist.fid.inception import InceptionNet

SETTING = "eval.inception_weights"  # the config key named in every error
HASH_SETTING = "eval.inception_sha256"  # the config key of the expected full SHA-256
STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"
_HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub's rule, with at least 8 hex digits


def _first_line(e: BaseException) -> str:
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
        raise ConfigError(f"{SETTING}: cannot download '{url}': {_first_line(e)}") from e


def _fetch_verified(weights: str, expected: str, cache_dir: str) -> bytes:
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


def _check_layout(net: InceptionNet, state: object, weights: str) -> None:
    """One-line ConfigError unless `state` has exactly the FID Inception keys and shapes."""
    if not isinstance(state, dict):
        raise ConfigError(f"{SETTING}: '{weights}' holds a {type(state).__name__}, not a state dict")
    wanted = net.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ConfigError(
            f"{SETTING}: '{weights}' is not an FID Inception state dict: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, value in wanted.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != value.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ConfigError(
                f"{SETTING}: '{weights}' is not an FID Inception state dict: {key} has shape {shape}, "
                f"expected {tuple(value.shape)}")


def load_inception(weights: str, sha256: str | None, cache_dir: str) -> InceptionNet:
    """The FID Inception with the configured weights, in eval mode, on the CPU, without gradients.

    Its `weights_sha256` attribute holds the full SHA-256 of the loaded file (for cache keys).

    weights: local path, or URL (http(s) through urllib; s3://, file://, ... through
      `tsvae_dist.storage`), of the converted TF weights; a URL is downloaded once into
      `cache_dir` and reused while its hash matches.
    sha256: the file's full SHA-256; None derives the expected prefix from the file name's
      `-<hex>.` suffix (the torch.hub rule), as for `pt_inception-2015-12-05-6726825d.pth`.
    cache_dir: where downloaded weights are kept.
    With several ranks, call it on one rank per node first (then a barrier) to download once.
    Every failure is a ConfigError naming `eval.inception_weights`.
    """
    if not weights:
        raise ConfigError(f"{SETTING}: not set; set it to the path or URL of {STANDARD_FILE}")
    data = _fetch_verified(weights, expected_sha256(weights, sha256), cache_dir)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or non-torch file
        raise ConfigError(f"{SETTING}: '{weights}' is not a torch weights file: {_first_line(e)}") from e
    net = InceptionNet()
    _check_layout(net, state, weights)
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = hashlib.sha256(data).hexdigest()
    return net.eval().requires_grad_(False)
