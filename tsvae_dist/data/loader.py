"""Deterministic streaming loader over tar shards, with exact mid-epoch resume.

The sample order is a function of (seed, epoch) and the number of *streams* only, never of the
world size or the worker count, so 1 and 2 ranks see the same global batches and a resumed run
sees what the uninterrupted one would have. The pipeline, stage by stage:

1. Shard order: each epoch the split's shard list is permuted with a generator seeded from
   (seed, epoch): the same permutation on every rank, a new one every epoch.
2. Dealing: the permuted list is dealt round-robin to `streams` streams (stream g gets shards
   g, g+S, g+2S, ... of the permutation). Fewer shards than streams is refused up front.
3. Streams: a stream reads its shards in order (whole-shard reads, SHA-256 and count checked against
   the manifest) and shuffles the samples through a buffer seeded from (seed, epoch, stream, pass).
   Each pass over its shards is drained completely before the next begins, so a pass is a full
   shuffled permutation of the stream's samples.
4. Equal length: every stream yields exactly `steps_per_epoch = split_count // global_batch`
   micro-batches of `global_batch / streams` samples, i.e. N = steps_per_epoch · micro_batch
   samples. A stream holding T ≥ N samples yields N distinct ones and leaves T − N unseen this
   epoch (those that come last in its shuffled pass); a stream holding T < N yields all T and then
   N − T again from a second shuffled pass (a third if needed, ...). Distinct samples per epoch are
   therefore Σ_g min(N, T_g); it is every sample exactly once when the shards deal evenly (equal
   sample totals per stream) and the split count is a multiple of the global batch. Which samples
   are dropped or repeated changes every epoch with the shard permutation. Because every stream
   has the same length, every rank yields the same number of batches (no DDP hang).
5. Ranks and workers: rank r owns streams r·k ... r·k+k−1 (k = streams/world); its DataLoader
   worker w serves the rank's streams w, w+W, ... and emits, for each step, one micro-batch per
   stream in stream order. The DataLoader's in-order round-robin over workers then delivers the k
   micro-batches of a step consecutively in stream order (each carries its (step, stream) tag and
   the order is checked), and they are concatenated into the rank's batch for the step.
6. Resume: `epoch(e, start_step=s)` makes every stream pass its first s·micro_batch samples through
   the same shuffle without decoding them (decoding them when bad samples may be skipped, so the
   same ones are skipped), then yields steps s, s+1, ...: the tail of `epoch(e)`.

What is repeated or dropped, in short: with S streams, global batch B and a split of C samples, an
epoch is ⌊C/B⌋ steps; each stream yields N = ⌊C/B⌋·B/S samples. A stream holding more than N
samples drops its surplus this epoch (a different surplus every epoch); one holding fewer repeats
some of its samples (shuffled again). No sample is dropped or repeated when every stream holds
exactly N samples, e.g. equal shards, a shard count divisible by S, and B dividing C.

Guard rails: a shard is read whole and checked (SHA-256, tar structure, sample count) before any of
its samples is used; samples are decoded strictly (extension, shape, dtype). Any failure is a
DataError naming the shard and the sample key, and stops the job, unless `max_skipped_samples`
allows skipping: then each bad sample (or each sample of a bad shard) is logged with its shard and
key and counted once per rank and epoch; one more than the limit stops the job. An unreachable store
is never skipped: storage retries for a bounded time and then raises StorageError naming the URL.

Decoding is PNG/JPEG through PIL and `.npy` with allow_pickle=False, nothing else (shardformat). This
loader reads the shards itself rather than through a webdataset pipeline: webdataset 1.0.2 has no
deterministic dealing, no equal batch counts and no exact resume. The shards are plain webdataset
tars, and `storage.register_webdataset_opener` serves s3:// (and other fsspec URLs) to webdataset
pipelines built elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tsvae_dist.data import shardformat
from tsvae_dist.data.config import LoaderConfig
from tsvae_dist.data.workers import as_is, error_item, raise_if_error, stop_workers
from tsvae_dist.errors import ConfigError, DataError
from tsvae_dist.runtime.preemption import ignore_stop_signals
from tsvae_dist.storage import StorageError

log = logging.getLogger(__name__)

_SHARD_ORDER, _STREAM_SHUFFLE = 0, 1  # domain tags: keep the two random streams independent


def _rng(*ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(ids)))


def deal_shards(shards: list[dict], streams: int, seed: int, epoch: int) -> list[list[dict]]:
    """The shards of each stream for `epoch`: the (seed, epoch)-permuted list dealt round-robin."""
    order = _rng(seed, epoch, _SHARD_ORDER).permutation(len(shards))
    permuted = [shards[i] for i in order]
    return [permuted[g::streams] for g in range(streams)]


# ---------------------------------------------------------------------------------------------
# One stream (module-level and plain data only, so worker processes can be spawned, not just forked)


@dataclass(frozen=True)
class _StreamSpec:
    index: int  # global stream number: seeds its shuffle, tags its micro-batches
    shards: tuple[tuple[str, str, int], ...]  # (url, sha256, count) in reading order


@dataclass(frozen=True)
class _EpochSpec:
    kind: str
    shape: tuple[int, ...]
    seed: int
    epoch: int
    shuffle_buffer: int
    micro_batch: int
    steps: int
    start_step: int
    max_skipped: int  # bad samples a rank may skip this epoch (0: none)
    decode: dict | None = None  # the manifest's `decode` field (indexed WebDataset shards)


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer of `size`, drained at the end (so the output is a permutation)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    draws = iter(())
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        try:
            i = next(draws)
        except StopIteration:  # draw indices in blocks: one numpy call per 1024 samples
            draws = iter(rng.integers(0, size, 1024).tolist())
            i = next(draws)
        buf[i], item = item, buf[i]
        yield item
    for i in rng.permutation(len(buf)).tolist():
        yield buf[i]


class _Skips:
    """The bad samples one stream skipped this epoch: a count of distinct ones checked against the limit
    (a stream that wraps around meets the same ones again), and the messages not yet handed to the main
    process."""

    def __init__(self, stream: int, limit: int):
        self.stream, self.limit = stream, limit
        self.count = 0
        self.seen: set[str] = set()
        self.pending: list[tuple[int, str]] = []  # (samples, message)

    def add(self, error: DataError, what: str, samples: int = 1) -> None:
        """Skip `samples` samples (`what`: the shard, or shard and key) because of `error`, or re-raise it
        when the policy does not allow skipping."""
        if self.limit == 0:
            raise error
        if what in self.seen:
            return
        self.seen.add(what)
        self.count += samples
        if self.count > self.limit:
            raise DataError(f"loader: stream {self.stream} alone has {self.count} bad samples this epoch, more than "
                            f"loader.max_skipped_samples={self.limit}; the last: {error}") from error
        self.pending.append((samples, str(error)))

    def take(self) -> list[tuple[int, str]]:
        out, self.pending = self.pending, []
        return out


class _Prefetch:
    """`fn(*args)` running in a daemon thread (a read blocked on a dead server never holds up exit)."""

    def __init__(self, fn, *args):
        self._done = threading.Event()
        self._result, self._error = None, None
        threading.Thread(target=self._run, args=(fn, args), daemon=True).start()

    def _run(self, fn, args) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:  # handed to whoever asks for the result
            self._error = e
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


def _read_shard(url: str, sha256: str, count: int) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a whole shard, read and checked (hash, tar structure, count) before any is used."""
    return list(shardformat.iter_tar(url, sha256=sha256, count=count))


def _pass_samples(spec: _StreamSpec, skips: _Skips) -> Iterator[tuple[str, dict[str, bytes], str]]:
    # The next shard is fetched while this one is decoded: on object stores the GET then costs no time.
    ahead = _Prefetch(_read_shard, *spec.shards[0])
    for i, (url, _, count) in enumerate(spec.shards):
        current = ahead
        if i + 1 < len(spec.shards):
            ahead = _Prefetch(_read_shard, *spec.shards[i + 1])
        try:
            samples = current.result()
        except DataError as e:
            skips.add(e, url, samples=count)
            continue
        for key, files in samples:
            yield key, files, url


def _stream_samples(spec: _StreamSpec, ep: _EpochSpec, skips: _Skips
                    ) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """Endless raw samples of one stream: shuffled pass after shuffled pass over its shards."""
    for p in itertools.count():
        rng = _rng(ep.seed, ep.epoch, _STREAM_SHUFFLE, spec.index, p)
        n = 0
        for item in _shuffled(_pass_samples(spec, skips), ep.shuffle_buffer, rng):
            n += 1
            yield item
        if n == 0:  # every shard skipped: the stream would spin forever
            raise DataError(f"loader: stream {spec.index}: none of its shards "
                            f"{[url for url, _, _ in spec.shards]} is readable")


def _decode_or_skip(samples: Iterator[tuple[str, dict[str, bytes], str]], ep: _EpochSpec, skips: _Skips
             ) -> Iterator[tuple[str, shardformat.Sample]]:
    """Decoded samples; a bad one is skipped when the policy allows it (else its DataError propagates)."""
    for key, files, url in samples:
        try:
            sample = shardformat.decode_sample(url, key, files, ep.kind, list(ep.shape), ep.decode)
        except DataError as e:
            skips.add(e, f"{url} {key}")
            continue
        yield key, sample


def _stack(items: list[tuple[str, shardformat.Sample]], kind: str) -> dict:
    """Keys and numpy arrays (uint8 images): what crosses the worker pipe. Plain arrays pickle
    through the pipe faster than tensors go through shared memory at these sizes, and uint8 is a
    quarter of the float32 bytes."""
    names = ("image",) if kind == "image" else ("mu", "log_sigma")
    out: dict = {"key": [k for k, _ in items]}
    for name in names:
        out[name] = np.stack([s[name] for _, s in items])
    return out


def _stream_microbatches(spec: _StreamSpec, ep: _EpochSpec) -> Iterator[dict]:
    skips = _Skips(spec.index, ep.max_skipped)
    raw = _stream_samples(spec, ep, skips)
    samples = _decode_or_skip(raw, ep, skips)
    # Resume: the samples before start_step go through the same reads and shuffle. They are decoded
    # only when bad ones may be skipped (to skip the same ones); otherwise none was bad (or the run
    # would have stopped), and skipping them raw is exact and much cheaper.
    for _ in itertools.islice(samples if ep.max_skipped else raw, ep.start_step * ep.micro_batch):
        pass
    for step in range(ep.start_step, ep.steps):
        batch = _stack(list(itertools.islice(samples, ep.micro_batch)), ep.kind)
        batch["_step"], batch["_stream"], batch["_skips"] = step, spec.index, skips.take()
        yield batch


@dataclass(frozen=True)
class _RankPlan:
    """What a rank's streams need besides the epoch: plain data, pickled once into each worker."""

    root: str
    shards: tuple[dict, ...]  # the split's manifest entries
    streams: int  # all ranks' streams
    first: int  # this rank's first stream
    per_rank: int  # streams per rank
    ep: _EpochSpec  # epoch 0 from the start: `epoch` and `start_step` are replaced per epoch

    def specs(self, epoch: int) -> list[_StreamSpec]:
        plan = deal_shards(list(self.shards), self.streams, self.ep.seed, epoch)
        return [_StreamSpec(g, tuple((shardformat.shard_url(self.root, s["name"]), s["sha256"], s["count"])
                                     for s in plan[g]))
                for g in range(self.first, self.first + self.per_rank)]


class _RankStreams(IterableDataset):
    """The streams of one rank; in a DataLoader worker, only that worker's share of them.

    The epoch and start step are read from `control`, a tensor in shared memory that the loader
    sets before each pass: the workers persist across epochs (no new processes, imports and
    connections per epoch) and learn the next epoch when the DataLoader restarts their iteration."""

    def __init__(self, plan: _RankPlan):
        self.plan = plan
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start_step)

    def epoch_spec(self) -> _EpochSpec:
        epoch, start_step = (int(v) for v in self.control.tolist())
        return dataclasses.replace(self.plan.ep, epoch=epoch, start_step=start_step)

    def __iter__(self) -> Iterator[dict]:
        ep = self.epoch_spec()
        streams = self.plan.specs(ep.epoch)
        info = get_worker_info()
        mine = streams if info is None else streams[info.id::info.num_workers]
        producers = [_stream_microbatches(s, ep) for s in mine]
        try:
            for _ in range(ep.start_step, ep.steps):
                for producer in producers:
                    yield next(producer)
        except (DataError, StorageError) as e:
            if info is None:
                raise
            yield error_item(e)


# ---------------------------------------------------------------------------------------------
# The loader


class StreamLoader:
    """Per-rank batches of a split, deterministic in (seed, epoch, streams); see the module docstring.

    Attributes: `manifest` (the dataset's), `steps_per_epoch` (batches per epoch, equal on every
    rank), `micro_batch` (samples per stream per step), `streams` (resolved stream count),
    `batch_size` (samples per rank per step = global_batch / world).
    """

    def __init__(self, manifest_url_or_root: str, split: str, *, global_batch: int, rank: int, world: int,
                 cfg: LoaderConfig, seed: int, pin_memory: bool = False):
        cfg.validate(global_batch, world)
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside the world of size {world}")
        if seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {seed}")
        self.root = shardformat.dataset_root(manifest_url_or_root)
        self.manifest = shardformat.read_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise DataError(f"{shardformat.manifest_url(self.root)}: splits.{split}: no such split; "
                            f"have {sorted(self.manifest['splits'])}")
        self.split = split
        self.cfg = cfg
        self.seed = seed
        self.rank, self.world = rank, world
        self.global_batch = global_batch
        self.streams = cfg.resolve_streams(world)
        self.micro_batch = global_batch // self.streams
        self.batch_size = global_batch // world
        self._per_rank = self.streams // world
        entry = self.manifest["splits"][split]
        self._shards = entry["shards"]
        try:
            cfg.validate_split(entry, split, self.root, global_batch, world)
        except ConfigError as e:
            raise ConfigError(f"loader.{e}") from None
        self.steps_per_epoch = entry["count"] // global_batch
        self.pin_memory = pin_memory
        self._dataset = _RankStreams(_RankPlan(
            root=self.root, shards=tuple(self._shards), streams=self.streams, first=rank * self._per_rank,
            per_rank=self._per_rank,
            ep=_EpochSpec(kind=self.manifest["kind"], shape=tuple(self.manifest["shape"]), seed=seed, epoch=0,
                          shuffle_buffer=cfg.shuffle_buffer, micro_batch=self.micro_batch,
                          steps=self.steps_per_epoch, start_step=0, max_skipped=cfg.max_skipped_samples,
                          decode=self.manifest.get("decode"))))
        self._workers: DataLoader | None = None  # started by the first epoch, kept until close()
        self.skipped: list[str] = []
        """Messages (shard, key, reason) of the samples this rank skipped in the current epoch."""
        self.skipped_samples = 0
        """Bad samples this rank skipped in all epochs read so far (the count stage records report)."""

    def epoch_plan(self, epoch: int) -> list[list[dict]]:
        """The manifest shard entries each stream (all ranks) reads in `epoch`, in reading order."""
        return deal_shards(self._shards, self.streams, self.seed, epoch)

    def samples_per_stream(self) -> int:
        """N, the samples every stream yields per epoch."""
        return self.steps_per_epoch * self.micro_batch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Batches start_step .. steps_per_epoch-1 of `epoch`, exactly as an uninterrupted pass yields them.

        A batch: "key" (this rank's keys, in order) and "image" uint8 [N,C,H,W] (to be scaled to [0, 1]
        on the device: `workers.unit_float_on`) or "mu", "log_sigma" float32 [N,κ]; N = global_batch /
        world; in pinned memory with `pin_memory`. One epoch at a time: a new one starts after the last
        has ended or been abandoned.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        return self._batches(epoch, start_step)

    def _source(self) -> Iterator[dict]:
        """The micro-batches of the epoch set in the dataset's control: from this process (workers=0) or
        from the persistent worker processes (restarted on each call)."""
        if self.cfg.workers == 0:
            return iter(self._dataset)
        if self._workers is None:
            self._workers = DataLoader(self._dataset, batch_size=None, collate_fn=as_is,
                                       num_workers=self.cfg.workers, prefetch_factor=self.cfg.prefetch_factor,
                                       persistent_workers=True, multiprocessing_context=self.cfg.start_method,
                                       worker_init_fn=ignore_stop_signals)
            # Also at exit: the workers ignore SIGTERM (a preemption notice is the main process's to
            # handle), so multiprocessing's exit handler, which terminates and joins them, would hang.
            self._stop_workers = weakref.finalize(self, _stop_dataloader, self._workers)
        return iter(self._workers)

    def close(self) -> None:
        """Stop the worker processes now (else when the loader is garbage-collected, or at exit)."""
        if self._workers is not None:
            self._stop_workers()
            self._workers = None

    def _batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        if start_step == self.steps_per_epoch:
            return
        self._dataset.control.copy_(torch.tensor([epoch, start_step]))
        ep = self._dataset.epoch_spec()  # what the workers will read
        specs = self._dataset.plan.specs(epoch)
        source = self._source()
        self.skipped = []
        skipped = 0
        record = self._recorder()
        finished = False
        try:
            for step in range(ep.start_step, ep.steps):
                parts = [_next_part(source, step, spec.index) for spec in specs]
                for part in parts:
                    for samples, message in part["_skips"]:
                        skipped += samples
                        self.skipped_samples += samples
                        self.skipped.append(message)
                        log.warning("loader: skipped %d bad sample(s) (%d of loader.max_skipped_samples=%d this "
                                    "epoch on rank %d): %s", samples, skipped, ep.max_skipped, self.rank, message)
                        if skipped > ep.max_skipped:
                            raise DataError(f"loader: {skipped} bad samples this epoch on rank {self.rank}, more "
                                            f"than loader.max_skipped_samples={ep.max_skipped}; the last: {message}")
                batch = _concat(parts, self.pin_memory)
                if record is not None:
                    record.write(json.dumps({"epoch": ep.epoch, "step": step, "keys": batch["key"]}) + "\n")
                    record.flush()
                yield batch
            finished = True
        finally:
            if record is not None:
                record.close()
            if not finished:  # failed or abandoned: workers mid-epoch are stopped, not reused
                self.close()

    def _recorder(self) -> IO[str] | None:
        """The rank's key record, opened for appending (`record_keys`), or None."""
        if not self.cfg.record_keys:
            return None
        directory = self.cfg.record_keys.removeprefix("file://")
        os.makedirs(directory, exist_ok=True)
        return open(os.path.join(directory, f"rank-{self.rank}.jsonl"), "a")


def _stop_dataloader(workers: DataLoader) -> None:
    stop_workers(getattr(workers, "_iterator", None))


def _next_part(source: Iterator[dict], step: int, stream: int) -> dict:
    try:
        part = next(source)
    except StopIteration:
        raise RuntimeError(f"loader: stream {stream} ended before step {step}") from None
    raise_if_error(part)
    if (part["_step"], part["_stream"]) != (step, stream):
        raise RuntimeError(f"loader: got step {part['_step']} of stream {part['_stream']}, "
                           f"expected step {step} of stream {stream}")
    return part


def _concat(parts: list[dict], pin_memory: bool) -> dict:
    """The rank's batch from its streams' micro-batches, as tensors: uint8 images (a quarter of the
    bytes of floats to copy and to send to the device), written straight into pinned memory when
    asked (the concatenation is the one copy), so the copy to the GPU is asynchronous."""
    batch: dict = {"key": [k for p in parts for k in p["key"]]}
    for name in ("image", "mu", "log_sigma"):
        if name not in parts[0]:
            continue
        arrays = [p[name] for p in parts]
        if len(arrays) == 1 and not pin_memory:
            batch[name] = torch.from_numpy(arrays[0])
            continue
        shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
        out = torch.empty(shape, dtype=torch.from_numpy(arrays[0][:0]).dtype, pin_memory=pin_memory)
        np.concatenate(arrays, out=out.numpy())
        batch[name] = out
    return batch
