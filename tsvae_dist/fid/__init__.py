"""FID for tsvae-dist: the TF FID Inception port, its weights, sharded feature statistics, the distance.

Typical use (each rank extracts features of its own images; one all-reduce, then rank 0 scores):

    from tsvae_dist.fid.inception import FEATURE_DIM, extract_features, load_inception
    from tsvae_dist.fid.stats import FeatureStats, frechet_distance, load_reference_stats

    net = load_inception(weights, sha256, cache_dir).to(device)
    stats = FeatureStats(FEATURE_DIM, device)
    for images in loader:                      # uint8 NCHW, 1 or 3 channels, any size
        stats.add(extract_features(net, images))
    mu, sigma = stats.all_reduce().mean_cov()   # in place: every rank gets the totals
    fid = frechet_distance(mu, sigma, *load_reference_stats(ref_url)[:2])

Modules: `inception` (the network and loading its weights), `weights` (finding and verifying the
weights file, the pre-submission check; torch-free), `stats` (float64 sufficient statistics and the
Fréchet distance), `evaluator` (the evaluate stage's FID sets and cached reference statistics).
"""
