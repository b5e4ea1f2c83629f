"""The project's error types: each carries a one-line message naming the file, key or setting at fault."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting (e.g. `stage1.batch_size`)."""


class DataError(RuntimeError):
    """Input data is corrupt or inconsistent; the message names the shard URL and sample key."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (changed config, foreign encoder, ...); the message says why."""
