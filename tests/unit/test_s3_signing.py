"""Known-answer tests of the direct GET's request signing (storage/s3_direct.py), without a server.

A reference SigV4 signer written here from AWS's specification is first checked against the signature
AWS publishes for its GET Object example; the direct GET's requests, made with frozen time and
credentials, must then carry exactly the reference signature over the path and headers they send.
(The scripted-server tests accept any signature, and radosgw checks only what it is sent: a request
signed over another path than the one on its request line fails only there.)
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re

import pytest
from botocore.credentials import ReadOnlyCredentials

from tsvae_dist.storage import s3_direct

# AWS's example ("Signature Version 4, header-based auth: GET Object", Amazon S3 API reference)
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
AWS_EXAMPLE_SIGNATURE = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"


def reference_signature(secret: str, method: str, path: str, headers: dict[str, str], signed: list[str],
                        amz_date: str, region: str, payload_sha256: str) -> str:
    """SigV4 for S3 from the specification: canonical request (path as sent, S3 does not re-encode it),
    string to sign, HMAC key chain over date / region / service / aws4_request."""
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed)
    canonical = "\n".join([method, path, "", canonical_headers, ";".join(signed), payload_sha256])
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_reference_signer_reproduces_the_aws_published_example():
    headers = {"host": "examplebucket.s3.amazonaws.com", "range": "bytes=0-9",
               "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": "20130524T000000Z"}
    assert reference_signature(AWS_SECRET, "GET", "/test.txt", headers, sorted(headers), "20130524T000000Z",
                               "us-east-1", EMPTY_SHA256) == AWS_EXAMPLE_SIGNATURE


def _parse(request: bytes) -> tuple[str, str, dict[str, str]]:
    head = request.decode("latin-1").split("\r\n\r\n", 1)[0].split("\r\n")
    method, path, _ = head[0].split(" ")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, path, headers


def _check_signature(request: bytes, region: str) -> None:
    method, path, headers = _parse(request)
    auth = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request, "
                        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})", headers["authorization"])
    assert auth is not None, headers["authorization"]
    key_id, date, signed_region, signed, signature = auth.groups()
    assert (key_id, signed_region, date) == (AWS_KEY_ID, region, headers["x-amz-date"][:8])
    signed_names = signed.split(";")
    assert {"host", "x-amz-date", "x-amz-content-sha256"} <= set(signed_names)
    assert signature == reference_signature(AWS_SECRET, method, path, headers, signed_names, headers["x-amz-date"],
                                            region, headers["x-amz-content-sha256"])


@pytest.fixture
def frozen_clock(monkeypatch):
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: datetime.datetime(2013, 5, 24, 0, 0, 0))


def _direct(base_path: str = "", region: str = "us-east-1") -> s3_direct.DirectGet:
    return s3_direct.DirectGet(host="s3.example.internal:7480", address=("127.0.0.1", 7480), base_path=base_path,
                               region=region, credentials=ReadOnlyCredentials(AWS_KEY_ID, AWS_SECRET, None))


def _request_for(monkeypatch, direct: s3_direct.DirectGet, bucket: str, key: str) -> bytes:
    """The bytes `DirectGet.get` sends for (bucket, key), captured instead of sent."""
    sent = []

    class Captured(Exception):
        pass

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def settimeout(self, _):
            pass

        def setsockopt(self, *_):
            pass

        def sendall(self, data):
            sent.append(data)
            raise Captured

    with monkeypatch.context() as mp:
        mp.setattr(s3_direct.socket, "create_connection", lambda *a, **k: FakeSocket())
        with pytest.raises(Captured):
            direct.get(f"s3://{bucket}/{key}", bucket, key, timeout=1)
    return sent[0]


@pytest.mark.parametrize("base_path, key, line", [
    ("", "train/shard-000001.tar", "GET /bucket/train/shard-000001.tar HTTP/1.1"),
    ("", "dir/a b+ü~x.tar", "GET /bucket/dir/a%20b%2B%C3%BC~x.tar HTTP/1.1"),
    ("/gateway", "k=1&v;2.tar", "GET /gateway/bucket/k%3D1%26v%3B2.tar HTTP/1.1"),
])
def test_direct_get_signs_exactly_the_path_it_sends(frozen_clock, monkeypatch, base_path, key, line):
    request = _request_for(monkeypatch, _direct(base_path), "bucket", key)
    assert request.decode("latin-1").split("\r\n", 1)[0] == line
    _, _, headers = _parse(request)
    assert headers["x-amz-date"] == "20130524T000000Z" and headers["host"] == "s3.example.internal:7480"
    assert headers["x-amz-content-sha256"] == EMPTY_SHA256
    _check_signature(request, "us-east-1")


def test_a_request_signed_over_another_path_is_caught(frozen_clock, monkeypatch):
    request = _request_for(monkeypatch, _direct(region="eu-test-1"), "bucket", "a.tar")
    _check_signature(request, "eu-test-1")
    moved = request.replace(b"GET /bucket/a.tar ", b"GET /bucket/b.tar ", 1)
    with pytest.raises(AssertionError):
        _check_signature(moved, "eu-test-1")
    with pytest.raises(AssertionError):  # the region is part of the signature too
        _check_signature(request, "us-east-1")
