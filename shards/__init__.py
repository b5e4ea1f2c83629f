"""Dataset building in the `tsvae-shards/1` format: writer, sources, CLI (`python -m shards --help`)."""
