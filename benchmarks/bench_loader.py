"""Loader throughput on 64×64 RGB shards: local disk and S3, against webdataset `pipe:aws s3 cp` and memory.

One run measures, in decoded samples per second (each read once, as uint8 → float32 [B,3,64,64]):
- memory:    the same images from an in-memory uint8 array, shuffled batches (the ceiling);
- local:     our loader (tsvae_dist.data.loader.StreamLoader) from local files;
- s3:        our loader from the S3 server (whole-shard GETs through storage);
- wds-pipe:  webdataset over `pipe:aws s3 cp s3://... -` URLs, as open_clip streams from S3;
- wds-fsspec: webdataset over s3:// URLs through our opener (storage.register_webdataset_opener);
with 0 and 2 loader workers, each over `--epochs` passes, medians of
`--rounds` interleaved rounds, and prints the ratios. With `--isolate-server` everything is measured
twice: with the S3 server sharing the CPUs, and with the dev cluster's S3 daemons pinned to the
last CPU and the benchmark to the others (a store on other machines, as on a real cluster).
Targets: s3 >= 2.5x wds-pipe, s3 >= 0.8x local.

    eval "$(launch/dev_cluster.sh up --no-slurm)"   # or any S3: AWS_* variables, see tsvae_dist/storage.py
    python benchmarks/bench_loader.py [--samples 20480] [--per-shard 1280] [--format npy|png] [--batch 128]
        [--epochs 2] [--rounds 3] [--isolate-server]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from shards.common import write_split
from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.data.loader import LoaderConfig, StreamLoader
from tsvae_dist.data.synthetic import disc_images, sample_factors
from tsvae_dist.data.writer import finish_dataset

RES = 64


def build(root: str, n: int, per_shard: int, fmt: str) -> np.ndarray:
    """A 64×64 RGB image dataset at `root` (train split only); returns the images, uint8 [N,H,W,3]."""
    images = disc_images(sample_factors(np.random.default_rng(0), n, RES), RES)
    encode = shardformat.encode_npy if fmt == "npy" else shardformat.encode_image
    entry = write_split(root, "train", ((f"train-{i:08d}", encode(images[i])) for i in range(n)), per_shard, ext=fmt)
    finish_dataset(root, name="bench", kind="image", shape=[3, RES, RES], splits={"train": entry},
                   source={"bench": fmt})
    return images


PLACEMENT_NOTES = {
    "shared": "S3 server and loader share every CPU:",
    "isolated": "S3 server on the last CPU, loader on the others (a stand-in for a store on other machines):",
}
CEPH_DAEMONS = ("ceph-mon", "ceph-osd", "radosgw")


def server_pids() -> list[int]:
    """The S3 daemons of `launch/dev_cluster.sh` (its pid files), if it runs here."""
    state = os.environ.get("TSVAE_DEV_CLUSTER_DIR", "")
    pids = []
    for name in CEPH_DAEMONS:
        try:
            with open(os.path.join(state, "pids", f"{name}.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if os.path.isdir(f"/proc/{pid}"):
            pids.append(pid)
    return pids


def _set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (sched_setaffinity moves one thread only)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


@contextlib.contextmanager
def server_on_own_cpu(server: list[int] | None) -> Iterator[None]:
    """With `server` pids: those on the last CPU, this process (and children it starts) on the rest."""
    if not server:
        yield
        return
    everything = os.sched_getaffinity(0)
    last = max(everything)
    try:
        for pid in server:
            _set_affinity(pid, {last})
        _set_affinity(os.getpid(), everything - {last})
        yield
    finally:
        for pid in (*server, os.getpid()):
            with contextlib.suppress(OSError):
                _set_affinity(pid, everything)


def copy_tree(src: str, dst: str) -> None:
    for dirpath, _, names in os.walk(src):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), src).replace(os.sep, "/")
            storage.write_bytes_atomic(f"{dst}/{rel}", storage.read_bytes(os.path.join(dirpath, name)))


def timed(batches, total: int | None = None) -> float:
    """Samples per second through `batches` (asserting `total` samples came out, when given)."""
    start = time.perf_counter()
    seen = 0
    for batch in batches:
        seen += len(batch)
    elapsed = time.perf_counter() - start
    assert total is None or seen == total, (seen, total)
    return seen / elapsed


def memory(images: np.ndarray, batch: int, epochs: int) -> float:
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    steps = len(chw) // batch
    rng = np.random.default_rng(0)

    def batches():
        for _ in range(epochs):
            order = rng.permutation(len(chw))
            for i in range(steps):
                indices = order[i * batch:(i + 1) * batch]
                yield torch.from_numpy(np.divide(chw[indices], np.float32(255), dtype=np.float32))
    return timed(batches(), epochs * steps * batch)


def ours(root: str, batch: int, workers: int, epochs: int) -> float:
    cfg = LoaderConfig(workers=workers, streams=max(workers, 1))
    loader = StreamLoader(root, "train", global_batch=batch, rank=0, world=1, cfg=cfg, seed=0)
    batches = (b["image"] for epoch in range(epochs) for b in loader.epoch(epoch))
    return timed(batches, epochs * loader.steps_per_epoch * batch)


def _decode(sample: dict) -> np.ndarray:
    """The webdataset side decodes exactly as our loader does (strict, never unpickling)."""
    ext = "npy" if "npy" in sample else "png"
    return shardformat.decode_sample(sample["__url__"], sample["__key__"], {ext: sample[ext]}, "image", [3, RES, RES])[
        "image"]


def _to_float(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.divide(np.stack(images), np.float32(255), dtype=np.float32))


def wds(urls: list[str], batch: int, workers: int, epochs: int) -> float:
    import webdataset

    dataset = (webdataset.WebDataset(urls * epochs, shardshuffle=False, empty_check=False, nodesplitter=None)
               .shuffle(512).map(_decode).batched(batch, collation_fn=_to_float, partial=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         worker_init_fn=storage.webdataset_worker_init if workers else None)
    if workers == 0:
        storage.register_webdataset_opener()
    return timed(loader)  # each worker reads its share of the shards, in whole batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20480, help="images in the dataset")
    parser.add_argument("--per-shard", type=int, default=1280, help="images per shard (1280 npy: 16 MB)")
    parser.add_argument("--format", choices=("npy", "png"), default="npy", help="how images are stored")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per reader (the median is reported)")
    parser.add_argument("--isolate-server", action="store_true",
                        help="also measure with the dev cluster's S3 daemons on the last CPU and this benchmark "
                             "on the others (stands in for a store on other machines)")
    parser.add_argument("--bucket", default=os.environ.get("TSVAE_S3_BUCKET", "tsvae"), help="S3 bucket to use")
    args = parser.parse_args()
    if not shutil.which("aws"):
        sys.exit("the aws CLI is needed for the pipe: baseline (pip install awscli)")
    if not storage.s3_endpoint() and not os.environ.get("AWS_ACCESS_KEY_ID"):
        sys.exit("no S3 configured: eval \"$(launch/dev_cluster.sh up --no-slurm)\" first")
    torch.set_num_threads(1)
    # With the server pinned, torch counts one CPU and warns about 2 workers; measuring that is the point.
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    local = os.path.join(tmp, "data")
    remote = f"s3://{args.bucket}/bench-loader-{uuid.uuid4().hex[:8]}"
    try:
        images = build(local, args.samples, args.per_shard, args.format)
        copy_tree(local, remote)
        shards = shardformat.read_manifest(local)["splits"]["train"]["shards"]
        endpoint = storage.s3_endpoint()
        flag = f" --endpoint-url {endpoint}" if endpoint else ""
        pipe_urls = [f"pipe:aws s3 cp --quiet{flag} {remote}/{s['name']} -" for s in shards]
        s3_urls = [f"{remote}/{s['name']}" for s in shards]
        size = sum(os.path.getsize(os.path.join(local, s["name"])) for s in shards)
        print(f"{args.samples} images 64x64x3 ({args.format}) in {len(shards)} shards of "
              f"{size / len(shards) / 2**20:.1f} MB; batch {args.batch}; {platform.node()} {os.cpu_count()} cores; "
              f"S3 at {endpoint or 'AWS'}")

        readers = {("memory", 0): functools.partial(memory, images, args.batch, args.epochs)}
        for workers in (0, 2):
            readers[("local", workers)] = functools.partial(ours, local, args.batch, workers, args.epochs)
            readers[("s3", workers)] = functools.partial(ours, remote, args.batch, workers, args.epochs)
            readers[("wds-pipe", workers)] = functools.partial(wds, pipe_urls, args.batch, workers, args.epochs)
            readers[("wds-fsspec", workers)] = functools.partial(wds, s3_urls, args.batch, workers, args.epochs)
        placements = {"shared": None}
        if args.isolate_server:
            server = server_pids()
            if not server:
                sys.exit("--isolate-server: no dev cluster S3 daemons found (TSVAE_DEV_CLUSTER_DIR/pids)")
            placements["isolated"] = server
        # Rounds interleave readers and placements, so that a slow spell of the machine hits all alike.
        runs: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(args.rounds):
            for placement, server in placements.items():
                with server_on_own_cpu(server):
                    for (name, workers), reader in readers.items():
                        runs.setdefault((placement, name, workers), []).append(reader())
        rows = {key: statistics.median(rates) for key, rates in runs.items()}
        for placement in placements:
            print(f"\n{PLACEMENT_NOTES[placement]}\n{'reader':<12} {'workers':>7} {'samples/s':>10}   "
                  f"(median of {args.rounds} rounds; all rounds)")
            for (where, name, workers), rate in rows.items():
                if where == placement:
                    every = " ".join(f"{r:.0f}" for r in runs[(where, name, workers)])
                    print(f"{name:<12} {workers:>7} {rate:>10.0f}   {every}")
            for workers in (0, 2):
                row = {name: rows[(placement, name, workers if name != "memory" else 0)]
                       for name in ("memory", "local", "s3", "wds-pipe", "wds-fsspec")}
                print(f"{placement} workers={workers}: s3/wds-pipe {row['s3'] / row['wds-pipe']:.2f}x (target >= 2.5), "
                      f"s3/local {row['s3'] / row['local']:.2f}x (target >= 0.8), "
                      f"local/memory {row['local'] / row['memory']:.2f}x, "
                      f"wds-fsspec/wds-pipe {row['wds-fsspec'] / row['wds-pipe']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        storage.remove(remote)


if __name__ == "__main__":
    main()
