"""The data plane: the shard format (reader and writer), the streaming loader, shard prefetching, datasets.

Importing this package loads nothing heavy: `data.config` (the loader's and the dataset's settings)
is torch-free, so the launcher can validate a configuration without torch.
"""
