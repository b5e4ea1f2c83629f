"""FID for tsvae-dist: the TF FID Inception port, its weights, sharded feature statistics, the distance.

Typical use (each rank extracts features of its own images; one all-reduce, then rank 0 scores):

    net = load_inception(weights, sha256, cache_dir).to(device)
    stats = FeatureStats(FEATURE_DIM, device)
    for images in loader:                      # uint8 NCHW, 1 or 3 channels, any size
        stats.add(extract_features(net, images))
    mu, sigma = stats.all_reduce().mean_cov()   # in place: every rank gets the totals
    fid = frechet_distance(mu, sigma, *load_reference_stats(ref_url)[:2])
"""

from tsvae_dist.fid.inception import (
    FEATURE_DIM,
    InceptionNet,
    extract_features,
    fp32_precision,
    resize_bilinear_tf1,
)
from tsvae_dist.fid.stats import FeatureStats, frechet_distance, load_reference_stats, save_reference_stats
from tsvae_dist.fid.weights import load_inception

__all__ = [
    "FEATURE_DIM",
    "FeatureStats",
    "InceptionNet",
    "extract_features",
    "fp32_precision",
    "frechet_distance",
    "load_inception",
    "load_reference_stats",
    "resize_bilinear_tf1",
    "save_reference_stats",
]
