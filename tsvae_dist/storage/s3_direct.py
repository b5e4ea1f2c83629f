"""Whole-object S3 GETs over plain HTTP, the body received by one system call.

Why: the loader decodes samples in Python while a thread prefetches the next shard. Through s3fs
(aiohttp) a body arrives in small pieces, each of which needs the GIL back: next to a busy decoding
thread a 16 MB GET took ~340 ms instead of ~35 ms, so the prefetch hid nothing. Here the body
arrives through one `recv(length, MSG_WAITALL)`, with the GIL released for
the whole transfer, and the client spends ~4 ms of CPU per 16 MB instead of ~13-26 ms.

`storage.read_bytes` uses it for s3:// URLs when the endpoint is plain `http://` (an in-cluster
Ceph or MinIO) and credentials are at hand; `https://` endpoints, AWS itself included, keep going
through s3fs (TLS delivers 16 KiB records, one GIL round trip each). Requests are signed with
botocore's SigV4, the library s3fs builds on. `TSVAE_S3_DIRECT_GET=0` switches this path off.
One attempt per call, like every request in `storage`: that module owns the retry policy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import struct
import sys
import urllib.parse
import urllib.request

DIRECT_ENV = "TSVAE_S3_DIRECT_GET"
USER_AGENT = "tsvae-dist-direct-get"
_MAX_HEADER_BYTES = 64 << 10
_MAX_ERROR_BODY_BYTES = 64 << 10
# What botocore's credential and region lookup reads from the environment: part of the cache key.
_AUTH_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class Unsupported(Exception):
    """This response cannot be read here (no Content-Length): the caller reads the object another way."""


class RequestRefused(OSError):
    """The server answered with an error that repeating the request will not change (HTTP 400, 3xx, ...)."""


@dataclasses.dataclass(frozen=True)
class DirectGet:
    """Signed whole-object GETs against one plain-HTTP S3 endpoint (path-style addressing)."""

    host: str  # as sent in the Host header (and signed)
    address: tuple[str, int]
    base_path: str  # an endpoint may sit under a path prefix
    region: str
    credentials: object  # botocore Credentials (refreshable) or ReadOnlyCredentials

    def get(self, url: str, bucket: str, key: str, timeout: float) -> bytes:
        """The object's bytes. Errors: FileNotFoundError (404), PermissionError (401/403), RequestRefused
        (other 4xx/3xx), ConnectionError/TimeoutError (5xx, 429, a dropped or silent connection)."""
        path = f"{self.base_path}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        request = _signed_request(self, path)
        with socket.create_connection(self.address, timeout=timeout) as sock:
            # Blocking from here on, bounded by kernel timeouts: a socket with a Python timeout is
            # non-blocking underneath, where MSG_WAITALL returns whatever happens to be there.
            sock.settimeout(None)
            timeval = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            try:
                sock.sendall(request)
                status, headers = _read_head(sock, url)
                length = _content_length(headers, url)
                if status != 200:
                    raise _status_error(url, status, _read_body(sock, min(length, _MAX_ERROR_BODY_BYTES), url))
                return _read_body(sock, length, url)
            except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO expired without progress
                raise TimeoutError(f"{url}: no progress for {timeout:g} s") from None


def getter(options: dict) -> DirectGet | None:
    """A `DirectGet` for the s3fs `options` of `storage.s3_options()`, or None where this path does not apply."""
    if os.environ.get(DIRECT_ENV, "1") == "0" or sys.platform == "win32" or not hasattr(socket, "MSG_WAITALL"):
        return None
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if not endpoint or options.get("anon"):
        return None
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        return None
    if urllib.request.getproxies().get("http") and not urllib.request.proxy_bypass(parts.hostname):
        return None  # a proxy stands between: botocore knows how to talk through it
    credentials, region = _auth(options.get("key"), options.get("secret"), options.get("token"),
                                (options.get("client_kwargs") or {}).get("region_name"),
                                tuple(os.environ.get(name) for name in _AUTH_ENV))
    if credentials is None:
        return None
    return DirectGet(host=parts.netloc, address=(parts.hostname, parts.port or 80),
                     base_path=parts.path.rstrip("/"), region=region, credentials=credentials)


@functools.lru_cache(maxsize=8)
def _auth(key: str | None, secret: str | None, token: str | None, region: str | None,
          environment: tuple[str | None, ...]) -> tuple[object | None, str]:
    """(credentials, region): explicit keys when given (fsspec config), else the standard AWS chain.
    Resolved once per process and environment (a role's credentials refresh themselves)."""
    import botocore.session

    session = botocore.session.get_session()
    region = region or session.get_config_variable("region") or "us-east-1"
    if key and secret:
        from botocore.credentials import ReadOnlyCredentials

        return ReadOnlyCredentials(key, secret, token), region
    return session.get_credentials(), region


def _signed_request(direct: DirectGet, path: str) -> bytes:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    credentials = direct.credentials
    if hasattr(credentials, "get_frozen_credentials"):
        credentials = credentials.get_frozen_credentials()  # refreshes expiring (role) credentials
    request = AWSRequest(method="GET", url=f"http://{direct.host}{path}", headers={"Host": direct.host})
    S3SigV4Auth(credentials, "s3", direct.region).add_auth(request)
    lines = [f"GET {path} HTTP/1.1", *(f"{name}: {value}" for name, value in request.headers.items()),
             f"User-Agent: {USER_AGENT}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_head(sock: socket.socket, url: str) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers, consuming exactly the header: the body stays in the socket."""
    received = b""
    while True:
        ahead = sock.recv(65536, socket.MSG_PEEK)
        if not ahead:
            raise ConnectionError(f"{url}: connection closed before the response header")
        end = (received[-3:] + ahead).find(b"\r\n\r\n")
        if end >= 0:
            received += sock.recv(end + 4 - min(len(received), 3), socket.MSG_WAITALL)
            break
        received += sock.recv(len(ahead))
        if len(received) > _MAX_HEADER_BYTES:
            raise RequestRefused(f"{url}: response header over {_MAX_HEADER_BYTES} bytes")
    lines = received[:-4].decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not match:
        raise ConnectionError(f"{url}: not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "identity").lower() != "identity":
        raise Unsupported(f"{url}: transfer-encoding {headers['transfer-encoding']}")
    return int(match.group(1)), headers


def _content_length(headers: dict[str, str], url: str) -> int:
    if "content-length" not in headers:
        raise Unsupported(f"{url}: response without Content-Length")
    value = headers["content-length"]
    if not value.isdigit():
        raise ConnectionError(f"{url}: bad Content-Length {value[:40]!r}")
    return int(value)


def _read_body(sock: socket.socket, length: int, url: str) -> bytes:
    """`length` bytes, normally by one recv: into a fresh bytes object, no zero-filling, no copy after."""
    parts, got = [], 0
    while got < length:
        part = sock.recv(length - got, socket.MSG_WAITALL)  # the GIL is free meanwhile
        if not part:
            raise ConnectionError(f"{url}: connection closed after {got} of {length} bytes")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _status_error(url: str, status: int, body: bytes) -> OSError:
    code = re.search(rb"<Code>([^<]*)</Code>", body)
    what = f"HTTP {status}" + (f" {code.group(1).decode('utf-8', 'replace')}" if code else "")
    if status == 404:
        return FileNotFoundError(f"{url}: not found ({what})")
    if status in (401, 403):
        return PermissionError(f"{url}: access denied ({what})")
    if status in (408, 429) or status >= 500:
        return ConnectionError(f"{url}: {what}")
    return RequestRefused(f"{url}: {what}")
