"""tsvae-dist: distributed training of the Two-Stage VAE (Dai & Wipf, ICLR 2019)."""

__version__ = "0.1.0"
