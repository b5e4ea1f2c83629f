"""One whole-object S3 GET (16 MB by default), alone and beside a busy Python thread: obstore vs our
direct GET (`storage.s3_direct`) vs s3fs, in the same process against the same object.

With `--tls-front` the benchmark also starts a TLS front for the endpoint on loopback (socat with a
self-signed certificate made here) and adds rows for obstore and s3fs over https (the direct GET
speaks plain http only): the https path AWS itself needs.

With `--fork-check` it then runs, for each client, the loader's default case: the parent has used the
client, a DataLoader worker started by fork reads the object with a fresh client; a worker that does
not answer within 20 s counts as hung (obstore 0.12.1 holds one process-wide Tokio runtime, whose
threads do not survive a fork).

Why beside a busy thread: the loader decodes samples in Python while a thread fetches the next shard;
a client that needs the GIL for every small chunk of the body is slowed ~10x there. Reports the
median wall time per GET and the process CPU time per GET (client cost), over `--repeats`
interleaved rounds, and each client's ratio against the direct GET.

    eval "$(launch/dev_cluster.sh up --no-slurm)"   # or any S3 endpoint: AWS_* variables
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_s3_get.py [--mb 16] [--repeats 15] [--tls-front]
        [--fork-check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from tsvae_dist import storage
from tsvae_dist.storage import s3_direct


def busy(stop: threading.Event) -> None:
    """Pure-Python work holding the GIL as a decoding thread does."""
    x = 0
    while not stop.is_set():
        for i in range(10_000):
            x += i * i


def obstore_get(url: str, endpoint: str):
    """A whole-object GET through obstore, converted to `bytes` as `storage.read_bytes` would return it."""
    import obstore
    from obstore.store import S3Store

    bucket, _, key = url.removeprefix("s3://").partition("/")
    store = S3Store(bucket, endpoint=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                    access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                    secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                    client_options={"allow_http": True, "allow_invalid_certificates": endpoint.startswith("https"),
                                    "timeout": "60s", "connect_timeout": "10s", "read_timeout": "10s"},
                    retry_config={"max_retries": 0})

    def get() -> bytes:
        return bytes(obstore.get(store, key).bytes())

    return get


def s3fs_get(url: str, endpoint: str):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs={"verify": False}, skip_instance_cache=True,
                           config_kwargs={"retries": {"total_max_attempts": 1}})
    path = url.removeprefix("s3://")
    return lambda: fs.cat_file(path)


@contextlib.contextmanager
def tls_front(endpoint: str):
    """https://127.0.0.1:<port> in front of the plain-http `endpoint` (socat, a self-signed certificate)."""
    if not shutil.which("socat") or not shutil.which("openssl"):
        sys.exit("--tls-front needs socat and openssl (apt-get install socat openssl)")
    host, port = endpoint.removeprefix("http://").rstrip("/").split(":")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        front = probe.getsockname()[1]
        probe.close()
        pem = os.path.join(tmp, "front.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-keyout", pem, "-out", pem + ".crt"], check=True, capture_output=True)
        with open(pem, "a") as f, open(pem + ".crt") as crt:
            f.write(crt.read())
        proc = subprocess.Popen(["socat", f"OPENSSL-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork,cert={pem},verify=0",
                                 f"TCP:{host}:{port}"], stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            yield f"https://127.0.0.1:{front}"
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--bucket", default=os.environ.get("TSVAE_S3_BUCKET", ""))
    parser.add_argument("--tls-front", action="store_true", help="add https rows through a local TLS front")
    parser.add_argument("--fork-check", action="store_true", help="then read from a forked DataLoader worker")
    parser.add_argument("--fork-child", nargs=2, metavar=("CLIENT", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fork_child:
        return _fork_child(*args.fork_child)
    with tls_front(storage.s3_endpoint()) if args.tls_front else contextlib.nullcontext() as https:
        measure(args, https)


class _WorkerRead:
    """An IterableDataset (built lazily: torch is imported only for --fork-check) whose one item is the
    length of the object read by a client made in the worker."""

    def __new__(cls, make_client):
        import torch

        class Read(torch.utils.data.IterableDataset):
            def __iter__(self):
                yield len(make_client()())

        return Read()


def _clients_for_fork_check(url: str) -> dict:
    """name -> a function making a fresh client (a function returning the object's bytes)."""
    endpoint = storage.s3_endpoint()
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return {"direct": lambda: (lambda: s3_direct.getter(storage.s3_options()).get(url, bucket, key, 10.0)),
            "s3fs": lambda: s3fs_get(url, endpoint),
            "obstore": lambda: obstore_get(url, endpoint)}


def _fork_child(name: str, url: str) -> None:
    """In a process of its own: use client `name`, then read through it in a fork-started DataLoader worker."""
    import torch

    make = _clients_for_fork_check(url)[name]
    make()()  # the parent uses it first, as the trainer reads the manifest before starting workers
    loader = torch.utils.data.DataLoader(_WorkerRead(make), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", timeout=20)
    start = time.perf_counter()
    try:
        got = list(loader)
        print(f"ok ({got[0]} bytes in {time.perf_counter() - start:.1f} s)", flush=True)
    except RuntimeError as e:
        print(f"hung ({e})", flush=True)


def fork_check(url: str) -> dict[str, str]:
    """`_fork_child` for each client, each in a fresh process group, killed after 60 s."""
    out = {}
    for name in _clients_for_fork_check(url):
        proc = subprocess.Popen([sys.executable, __file__, "--fork-child", name, url], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=60)
            result = stdout.strip().splitlines()[-1] if stdout.strip() else f"crashed (exit {proc.returncode})"
            if proc.returncode not in (0, None) and not stdout.strip().startswith("hung"):
                result = f"crashed (exit {proc.returncode}){': ' + stdout.strip() if stdout.strip() else ''}"
        except subprocess.TimeoutExpired:
            result = "hung (no answer in 60 s)"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)  # the hung worker too
            proc.wait()
        out[name] = result
        print(json.dumps({"fork_check": name, "result": result}), flush=True)
    return out


def measure(args: argparse.Namespace, https: str | None) -> None:
    if not args.bucket or not storage.s3_endpoint():
        sys.exit("no S3 configured: eval \"$(launch/dev_cluster.sh up --no-slurm)\" first")
    url = f"s3://{args.bucket}/bench-get/{uuid.uuid4().hex[:8]}.bin"
    payload = os.urandom(args.mb << 20)
    storage.write_bytes_atomic(url, payload)
    fs, path = storage.filesystem(url)
    direct = s3_direct.getter(storage.s3_options())
    bucket, _, key = path.partition("/")
    clients = {
        "direct": lambda: direct.get(url, bucket, key, 10.0),
        "obstore": obstore_get(url, storage.s3_endpoint()),
        "s3fs": lambda: fs.cat_file(path),
    }
    if https:
        clients["obstore https"] = obstore_get(url, https)
        clients["s3fs https"] = s3fs_get(url, https)
    for name, get in clients.items():  # warm-up and a correctness check
        assert bytes(get()) == payload, name
    times = {(n, b): [] for n in clients for b in (False, True)}
    cpu = {(n, b): [] for n in clients for b in (False, True)}
    try:
        for _ in range(args.repeats):
            for with_busy in (False, True):
                stop = threading.Event()
                thread = threading.Thread(target=busy, args=(stop,), daemon=True) if with_busy else None
                if thread:
                    thread.start()
                    time.sleep(0.05)
                for name, get in clients.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    get()
                    times[(name, with_busy)].append(time.perf_counter() - t0)
                    cpu[(name, with_busy)].append(time.process_time() - c0)
                if thread:
                    stop.set()
                    thread.join()
        if args.fork_check:
            fork_check(url)
    finally:
        storage.remove(url)
    rows = []
    for with_busy in (False, True):
        base = statistics.median(times[("direct", with_busy)])
        for name in clients:
            ms = statistics.median(times[(name, with_busy)]) * 1000
            row = {"client": name, "busy_thread": with_busy, "median_ms": round(ms, 1),
                   "vs_direct": round(ms / (base * 1000), 2)}
            if not with_busy:  # beside a busy thread the process CPU time counts the thread's too
                row["cpu_ms"] = round(statistics.median(cpu[(name, with_busy)]) * 1000, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.mb} MB GET, median of {args.repeats} | alone (ms) | client CPU (ms) | beside a busy thread (ms) |"
          " vs direct, alone | vs direct, busy |")
    print("|---|---|---|---|---|---|")
    by = {(r["client"], r["busy_thread"]): r for r in rows}
    for name in clients:
        a, b = by[(name, False)], by[(name, True)]
        print(f"| {name} | {a['median_ms']} | {a['cpu_ms']} | {b['median_ms']} | {a['vs_direct']} | {b['vs_direct']} |")


if __name__ == "__main__":
    main()
