"""The embedded default dataset: images on a manifold of known intrinsic dimension.

Each RGB image shows one anti-aliased disc on a plain dark background. Its only factors of
variation are the centre (x, y), the radius and the hue, so the images lie on a 4-dimensional
manifold (an interval³ × circle) inside [0,1]^(3·H·W): the regime the Two-Stage VAE paper is about
(γ_x → 0, about 4 active latent dimensions). Generated offline from a seed, deterministically: the
same parameters give byte-identical shards and manifest, so ranks that build it concurrently write
the same bytes and the atomic writes make the race harmless.
"""

from __future__ import annotations

import numpy as np

from tsvae_dist import storage
from tsvae_dist.data import shardformat
from tsvae_dist.data.writer import ShardWriter, finish_dataset
from tsvae_dist.errors import DataError

INTRINSIC_DIM = 4
GENERATOR = "synthetic-disc/2"
BACKGROUND = (0.08, 0.08, 0.08)  # RGB in [0,1]
RADIUS = (0.12, 0.30)  # radius range, as a fraction of the resolution
# Hue from red through green to blue, not round the whole wheel: a circle would need two latent
# dimensions to embed continuously, and the true dimension would no longer be 4.
HUE_MAX = 2.0 / 3.0
SATURATION, VALUE = 0.85, 0.95  # fixed HSV saturation and value of the disc colour
_SPLIT_STREAMS = {"train": 0, "test": 1}  # independent random streams per split
_CHUNK = 1024  # images generated per vectorised chunk (bounds memory)


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """RGB [n,3] in [0,1] from hue h [n] in [0,1) at fixed saturation and value."""
    k = (np.array([5.0, 3.0, 1.0])[None, :] + 6.0 * h[:, None]) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def disc_images(factors: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [n,H,W,3] images from factors [n,4] = (x, y, radius, hue), x/y/radius in pixels."""
    x, y, r, hue = (factors[:, i] for i in range(4))
    centres = np.arange(resolution, dtype=np.float64) + 0.5  # pixel centres
    dx = centres[None, None, :] - x[:, None, None]
    dy = centres[None, :, None] - y[:, None, None]
    # coverage ramps linearly over one pixel across the edge: a soft, anti-aliased boundary
    alpha = np.clip(r[:, None, None] - np.sqrt(dx * dx + dy * dy) + 0.5, 0.0, 1.0)[..., None]
    colour = _hsv_to_rgb(hue, SATURATION, VALUE)[:, None, None, :]
    img = np.asarray(BACKGROUND)[None, None, None, :] * (1.0 - alpha) + colour * alpha
    return np.rint(img * 255.0).astype(np.uint8)


def sample_factors(rng: np.random.Generator, n: int, resolution: int) -> np.ndarray:
    """[n,4] factors drawn uniformly; the centre keeps the largest disc inside the image."""
    r_lo, r_hi = RADIUS[0] * resolution, RADIUS[1] * resolution
    x = rng.uniform(r_hi, resolution - r_hi, n)
    y = rng.uniform(r_hi, resolution - r_hi, n)
    r = rng.uniform(r_lo, r_hi, n)
    hue = rng.uniform(0.0, HUE_MAX, n)
    return np.stack([x, y, r, hue], axis=1)


def _params(resolution: int, train: int, test: int, samples_per_shard: int, seed: int) -> dict:
    params = {"resolution": resolution, "train": train, "test": test, "samples_per_shard": samples_per_shard,
              "seed": seed}
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"synthetic: {key}: expected an integer, got {value!r}")
    if resolution < 4 or train < 1 or test < 1 or samples_per_shard < 1 or seed < 0:
        raise DataError("synthetic: need resolution >= 4, train/test/samples_per_shard >= 1, seed >= 0; "
                        f"got {params}")
    return params


def build_synthetic(root_url: str, resolution: int = 32, train: int = 8192, test: int = 1024,
                    samples_per_shard: int = 512, seed: int = 0, encoding: str = "png") -> dict:
    """Generate the dataset into `root_url` (shards first, manifest last); returns the manifest.

    `encoding` (shardformat.ENCODINGS) changes how samples are stored, not their pixels: it is recorded
    in `source`, outside `params`, so `ensure_synthetic` accepts either."""
    params = _params(resolution, train, test, samples_per_shard, seed)
    if encoding not in shardformat.ENCODINGS:
        raise DataError(f"synthetic: encoding: {encoding!r} is not one of {list(shardformat.ENCODINGS)}")
    splits = {}
    for split, count in (("train", train), ("test", test)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAMS[split]]))
        with ShardWriter(root_url, split, samples_per_shard) as writer:
            for start in range(0, count, _CHUNK):
                n = min(_CHUNK, count - start)
                images = disc_images(sample_factors(rng, n, resolution), resolution)
                for i in range(n):
                    writer.add(f"{split}-{start + i:08d}", {encoding: shardformat.encode_image_as(images[i], encoding)})
        splits[split] = writer.close()
    source = {
        "generator": GENERATOR,
        "params": params,
        "encoding": encoding,
        "factors": {"x": "uniform centre column, pixels", "y": "uniform centre row, pixels",
                    "radius": f"uniform in {list(RADIUS)} x resolution", "hue": f"uniform in [0, {HUE_MAX:.4g}), HSV"},
        "background": list(BACKGROUND),
    }
    return finish_dataset(root_url, name=f"synthetic-disc-{resolution}", kind="image",
                          shape=[3, resolution, resolution], splits=splits, source=source,
                          intrinsic_dim=INTRINSIC_DIM)


def ensure_synthetic(root_url: str, resolution: int = 32, train: int = 8192, test: int = 1024,
                     samples_per_shard: int = 512, seed: int = 0) -> dict:
    """The dataset at `root_url`, built on first use; DataError if one with other parameters is there."""
    params = _params(resolution, train, test, samples_per_shard, seed)
    url = shardformat.manifest_url(root_url)
    if not storage.exists(url):
        return build_synthetic(root_url, **params)
    manifest = shardformat.read_manifest(root_url)
    source = manifest["source"]
    if source.get("generator") != GENERATOR:
        raise DataError(f"{url}: source.generator: {source.get('generator')!r} is not {GENERATOR!r}; "
                        "choose another directory for the synthetic dataset")
    built = source.get("params", {})
    for key, value in params.items():
        if built.get(key) != value:
            raise DataError(f"{url}: source.params.{key}: built with {built.get(key)!r}, asked for "
                            f"{value!r}; use another directory or the same parameters")
    return manifest
