"""Developer tools for tsvae-dist (stdlib only; run them with ``python -m tsvae_dist.tools.<name>``)."""
