"""Loading the Inception weights: hash checks, one-line ConfigErrors, a URL downloaded once and cached."""

import hashlib
import http.server
import os
import shutil
import threading

import pytest
import torch

from tsvae_dist.errors import ConfigError
from tsvae_dist.fid.inception import InceptionNet, load_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FID Inception state dict saved under the torch.hub naming rule, and its SHA-256."""
    torch.manual_seed(0)
    state = InceptionNet().state_dict()
    folder = tmp_path_factory.mktemp("weights")
    tmp = folder / "weights.pth"
    torch.save(state, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"inception-random-{sha[:8]}.pth"
    tmp.rename(path)
    return path, sha, state


def _config_error(weights: str, sha256: str | None, cache_dir: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_inception(weights, sha256, cache_dir)
    message = str(info.value)
    assert message.startswith("eval.inception_weights: ") and "\n" not in message
    return message


def _assert_loaded(net: InceptionNet, state: dict[str, torch.Tensor]) -> None:
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_loads_with_hash_from_file_name_or_explicit(weights, tmp_path):
    path, sha, state = weights
    net = load_inception(str(path), None, str(tmp_path))
    _assert_loaded(net, state)
    assert net.weights_sha256 == sha  # the full hash, for cache keys
    _assert_loaded(load_inception(str(path), sha.upper(), str(tmp_path)), state)
    assert not os.listdir(tmp_path)  # local files are used in place, never copied to the cache


def test_missing_or_unset_weights_name_the_setting(tmp_path):
    message = _config_error(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"), None, str(tmp_path))
    assert "no file" in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "not set" in _config_error("", None, str(tmp_path))


def test_wrong_hash_says_expected_and_got(weights, tmp_path):
    path, sha, _ = weights
    message = _config_error(str(path), "0" * 64, str(tmp_path))
    assert f"expected {'0' * 64}, got {sha}" in message
    # The standard file name carries its hash prefix: a different file under that name is refused.
    standard = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    shutil.copy(path, standard)
    assert f"expected 6726825d..., got {sha}" in _config_error(str(standard), None, str(tmp_path))


def test_unverifiable_name_without_hash_is_refused(weights, tmp_path):
    path, _, _ = weights
    plain = tmp_path / "inception.pth"
    shutil.copy(path, plain)
    assert "no '-<sha256 prefix>.' suffix" in _config_error(str(plain), None, str(tmp_path))
    assert "is not 64 hex" in _config_error(str(plain), "abc", str(tmp_path))


def test_foreign_state_dict_is_refused(tmp_path):
    path = tmp_path / "foreign.pth"
    state = InceptionNet().state_dict()
    del state["fc.bias"]
    state["Mixed_7c.branch1x1.conv.weight"] = torch.zeros(1)
    torch.save(state, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert "1 missing keys ['fc.bias']" in _config_error(str(path), sha, str(tmp_path))
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert "Mixed_7c.branch1x1.conv.weight has shape (1,)" in _config_error(str(path), sha, str(tmp_path))
    path.write_bytes(b"not a torch file")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert "not a torch weights file" in _config_error(str(path), sha, str(tmp_path))


@pytest.fixture
def http_server(weights):
    """A local HTTP server over the weights' folder, counting the GET requests it answers."""
    path, _, _ = weights
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(path.parent), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()
    thread.join()


def test_url_is_downloaded_once_into_cache(weights, tmp_path, http_server):
    path, _, state = weights
    base, requests = http_server
    url = f"{base}/{path.name}"
    cache = tmp_path / "cache"
    _assert_loaded(load_inception(url, None, str(cache)), state)
    assert requests == [f"/{path.name}"]
    assert os.listdir(cache) == [path.name]  # no temporary file left behind
    _assert_loaded(load_inception(url, None, str(cache)), state)
    assert len(requests) == 1  # served from the cache

    (cache / path.name).write_bytes(b"truncated")  # a corrupt cached copy is replaced
    _assert_loaded(load_inception(url, None, str(cache)), state)
    assert len(requests) == 2 and (cache / path.name).read_bytes() == path.read_bytes()


def test_bad_download_is_not_cached(weights, tmp_path, http_server):
    path, _, _ = weights
    base, _ = http_server
    cache = tmp_path / "cache"
    assert "cannot download" in _config_error(f"{base}/absent-0123456789.pth", None, str(cache))
    assert "wrong SHA-256" in _config_error(f"{base}/{path.name}", "1" * 64, str(cache))
    assert not cache.exists() or not os.listdir(cache)


def test_file_url_is_cached_too(weights, tmp_path):
    path, _, state = weights
    cache = tmp_path / "cache"
    _assert_loaded(load_inception(f"file://{path}", None, str(cache)), state)
    assert (cache / path.name).read_bytes() == path.read_bytes()
