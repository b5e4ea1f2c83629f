"""The data plane's settings: which dataset a run reads and how it is streamed (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from tsvae_dist.errors import ConfigError

_START_METHODS = ("fork", "spawn", "forkserver")


@dataclass
class DatasetConfig:
    name: str = "synthetic"  # one of config.DATASETS; selects the paper's preset values in conf/dataset/
    root: str = ""  # URL of the shard directory holding manifest.json; "" = <data_root>/<name>
    channels: int = 3  # image channels the shards hold (1 for MNIST/Fashion, 3 otherwise)
    resolution: int = 32  # image side in pixels the shards hold
    source: str = ""  # the raw dataset the shards must be built from (manifest source.dataset, e.g. "celeba",
    #                   "celebahq"; the builder `python -m shards <source>`); "" = any. Set by the presets.
    synthetic_train: int = 8192  # synthetic only: training images built on first use
    synthetic_test: int = 1024  # synthetic only: test images built on first use
    synthetic_samples_per_shard: int = 512  # synthetic only: images per tar shard


@dataclass
class LoaderConfig:
    """How samples are streamed; the global batch sequence depends only on `streams`, `shuffle_buffer`
    and the seed (see `tsvae_dist.data.loader`)."""

    workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process itself."""
    streams: int = 0
    """Number of deterministic sample streams (0: world × max(workers, 1)). Each global batch is one
    micro-batch of global_batch/streams samples from every stream, so keep this fixed to get the same
    batches on any world size and worker count. Must be a multiple of the world size, a multiple of
    `workers` per rank, divide the global batch, and not exceed the number of shards of the split."""
    shuffle_buffer: int = 512
    """Samples held by each stream's seeded shuffle buffer; 0 or 1 keeps the shard order."""
    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead (ignored when workers is 0)."""
    start_method: str = "fork"
    """How worker processes start: fork (fastest to start), spawn or forkserver."""
    max_skipped_samples: int = 0
    """Bad samples (undecodable, wrong shape or dtype; every sample of a corrupt shard) each rank may
    skip per epoch, each logged with its shard and key; one more stops the job. 0: the first stops it.
    stage1's value is the policy of every stage reading the images: encode and evaluate apply it per
    rank to their one pass, and each stage records how many it skipped (`skipped_samples`)."""
    record_keys: str = ""
    """Debugging: a local directory; each rank appends one JSON line {epoch, step, keys} per batch to
    `rank-<rank>.jsonl` there. "" records nothing."""

    def validate_split(self, split_entry: dict, split: str, root: str, global_batch: int, world: int) -> None:
        """Raise ConfigError when a split's shards cannot feed these streams (messages as `validate`'s).

        Checked by the loader and, before any job is submitted, by the launcher on the dataset it just read.
        """
        streams, shards = self.resolve_streams(world), len(split_entry["shards"])
        if shards < streams:
            raise ConfigError(f"streams: {streams} streams but split {split!r} of {root} has only {shards} "
                              f"shards; use at most {shards} streams (fewer ranks or workers) or re-shard with "
                              "fewer samples per shard")
        if split_entry["count"] // global_batch < 1:
            raise ConfigError(f"streams: the global batch {global_batch} exceeds the {split_entry['count']} "
                              f"samples of split {split!r}")

    def resolve_streams(self, world: int) -> int:
        """The number of streams actually used for `world` ranks."""
        return self.streams if self.streams > 0 else world * max(self.workers, 1)

    def validate(self, global_batch: int, world: int) -> None:
        """Raise ConfigError when the settings cannot work for this batch and world.

        Messages start with the bare field name (`streams: ...`); callers prefix the config path.
        """
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        if self.streams < 0:
            raise ConfigError(f"streams: must be >= 0 (0 = world x workers), got {self.streams}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor: must be >= 1, got {self.prefetch_factor}")
        if self.max_skipped_samples < 0:
            raise ConfigError(f"max_skipped_samples: must be >= 0, got {self.max_skipped_samples}")
        if self.record_keys and "://" in self.record_keys and not self.record_keys.startswith("file://"):
            raise ConfigError(f"record_keys: must be a local directory, got {self.record_keys!r}")
        if self.start_method not in _START_METHODS:
            raise ConfigError(f"start_method: unknown {self.start_method!r}; "
                              f"choose one of {_START_METHODS}")
        if world < 1:
            raise ConfigError(f"streams: needs a world size >= 1, got {world}")
        streams = self.resolve_streams(world)
        if streams % world:
            raise ConfigError(f"streams: {streams} is not a multiple of the world size {world}")
        if self.workers and (streams // world) % self.workers:
            raise ConfigError(f"streams: {streams // world} streams per rank ({streams} / world "
                              f"{world}) is not a multiple of workers={self.workers}")
        if global_batch < 1 or global_batch % streams:
            raise ConfigError(f"streams: {streams} does not divide the global batch {global_batch}")
