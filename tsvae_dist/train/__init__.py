"""The training loop both stages share, and its plumbing: checkpoints, the metrics log, mixed precision."""
