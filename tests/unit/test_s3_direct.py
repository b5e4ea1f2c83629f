"""The direct S3 GET path (tsvae_dist/storage/s3_direct.py) against a scripted HTTP server on loopback.

Each case answers one request in a chosen way (split headers, errors, silence, a dropped body,
chunked encoding) and checks what `s3_direct` and `storage.read_bytes` make of it. Signatures are
checked against the real server in test_s3.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tsvae_dist import storage
from tsvae_dist.storage import s3_direct

Handler = Callable[[socket.socket, bytes], None]


@contextlib.contextmanager
def scripted_server(*handlers: Handler) -> Iterator[tuple[str, list[bytes]]]:
    """An HTTP endpoint answering the n-th connection with handlers[min(n, last)]; yields (url, requests)."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        n = 0
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                requests.append(request)
                handlers[min(n, len(handlers) - 1)](conn, request)
                n += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", requests
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def respond(status: int, body: bytes, headers: dict[str, str] | None = None, pieces: int = 1) -> Handler:
    """A handler sending status, headers and body, the whole response split into `pieces` sends."""
    def handle(conn: socket.socket, _: bytes) -> None:
        head = {"Content-Length": str(len(body)), **(headers or {})}
        data = (f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode()
        data += body
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            conn.sendall(data[i:i + step])
            time.sleep(0.001)
    return handle


def s3_error(status: int, code: str) -> Handler:
    return respond(status, f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode())


def silent(conn: socket.socket, _: bytes) -> None:
    time.sleep(1.2)


def cut_after(n: int, total: int) -> Handler:
    def handle(conn: socket.socket, _: bytes) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode() + bytes(n))
    return handle


@pytest.fixture
def endpoint_env(monkeypatch):
    """Credentials and settings for the scripted endpoint; returns a function that points at one."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-test-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv(s3_direct.DIRECT_ENV, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TSVAE_STORAGE_RETRY_S", "3")
    monkeypatch.setenv("TSVAE_STORAGE_TIMEOUT_S", "1")

    def point_at(url: str) -> s3_direct.DirectGet:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        direct = s3_direct.getter(storage.s3_options())
        assert direct is not None
        return direct

    return point_at


def test_body_and_signed_request(endpoint_env):
    body = bytes(range(256)) * 4096 + b"tail"
    with scripted_server(respond(200, body, {"ETag": '"x"'}, pieces=7)) as (url, requests):
        direct = endpoint_env(url)
        got = direct.get("s3://b/k", "b", "dir/a b+ü.bin", timeout=1)
    assert got == body and isinstance(got, bytes)
    head = requests[0].decode("latin-1")
    assert head.startswith("GET /b/dir/a%20b%2B%C3%BC.bin HTTP/1.1\r\n")
    assert "Authorization: AWS4-HMAC-SHA256 Credential=AKIDTEST/" in head and "/eu-test-1/s3/aws4_request" in head
    assert "X-Amz-Date: " in head and "Host: 127.0.0.1:" in head


def test_errors_name_the_url_and_map_to_their_kind(endpoint_env):
    cases = [(s3_error(404, "NoSuchKey"), FileNotFoundError, "not found \\(HTTP 404 NoSuchKey\\)"),
             (s3_error(403, "AccessDenied"), PermissionError, "access denied \\(HTTP 403 AccessDenied\\)"),
             (s3_error(503, "SlowDown"), ConnectionError, "HTTP 503 SlowDown"),
             (s3_error(400, "InvalidRequest"), s3_direct.RequestRefused, "HTTP 400 InvalidRequest"),
             (cut_after(100, 1000), ConnectionError, "connection closed after 100 of 1000 bytes"),
             (respond(200, b"x", {"Content-Length": "1; x"}), ConnectionError, "bad Content-Length '1; x'"),
             (silent, TimeoutError, "no progress for 0.5 s")]
    for handler, error, message in cases:
        with scripted_server(handler) as (url, _):
            direct = endpoint_env(url)
            start = time.monotonic()
            with pytest.raises(error, match=f"^s3://b/k: {message}"):
                direct.get("s3://b/k", "b", "k", timeout=0.5)
            assert time.monotonic() - start < 2


def test_storage_retries_transient_answers_and_not_permanent_ones(endpoint_env):
    with scripted_server(s3_error(503, "SlowDown"), cut_after(10, 50), respond(200, b"x" * 50)) as (url, requests):
        endpoint_env(url)
        assert storage.read_bytes("s3://b/k") == b"x" * 50
        assert len(requests) == 3
    with scripted_server(s3_error(400, "InvalidRequest"), respond(200, b"never")) as (url, requests):
        endpoint_env(url)
        with pytest.raises(s3_direct.RequestRefused, match="HTTP 400"):
            storage.read_bytes("s3://b/k")
        assert len(requests) == 1
    with scripted_server(s3_error(404, "NoSuchKey")) as (url, requests):
        endpoint_env(url)
        with pytest.raises(FileNotFoundError, match="^s3://b/k: not found"):
            storage.read_bytes("s3://b/k")
        assert len(requests) == 1
    with scripted_server(silent) as (url, _):
        endpoint_env(url)
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match=r"^s3://b/k: read failed for \d+ s .*no progress for 1 s"):
            storage.read_bytes("s3://b/k")
        assert time.monotonic() - start < 3 + 1 + 2


def test_unsupported_answer_falls_back_to_s3fs(endpoint_env):
    def by_client(conn: socket.socket, request: bytes) -> None:
        if s3_direct.USER_AGENT.encode() in request:  # ours: an answer it cannot read
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n")
        else:  # s3fs
            respond(200, b"wxyz", {"Content-Type": "binary/octet-stream"})(conn, request)

    with scripted_server(by_client) as (url, requests):
        endpoint_env(url)
        assert storage.read_bytes("s3://b/k") == b"wxyz"
    assert s3_direct.USER_AGENT.encode() in requests[0]
    assert s3_direct.USER_AGENT.encode() not in requests[-1]


def test_where_the_direct_path_applies(endpoint_env, monkeypatch):
    direct = endpoint_env("http://127.0.0.1:9/prefix/")
    assert (direct.address, direct.base_path, direct.region) == (("127.0.0.1", 9), "/prefix", "eu-test-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org")
    assert s3_direct.getter(storage.s3_options()) is None  # TLS: s3fs
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.internal:7480")
    monkeypatch.setenv("http_proxy", "http://proxy.internal:3128")
    assert s3_direct.getter(storage.s3_options()) is None  # through a proxy: s3fs
    monkeypatch.setenv("no_proxy", "s3.internal")
    assert s3_direct.getter(storage.s3_options()) is not None
    monkeypatch.setenv(s3_direct.DIRECT_ENV, "0")
    assert s3_direct.getter(storage.s3_options()) is None
