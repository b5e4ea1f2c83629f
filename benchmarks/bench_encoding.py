"""Sample encoding, PNG vs raw uint8 .npy: decoding samples/s on one loader core and bytes per sample.

For each resolution, the same images are written as shards twice (`shardformat.encode_image_as`, as
the builders' `--encoding png|npy` writes them) and read back the way one loader worker reads a shard
(`prefetch.decode_image_shard`: the whole shard from local disk, its SHA-256 checked, the tar parsed,
every sample decoded to uint8 [C,H,W]), in this one process with one thread. Rounds alternate PNG and
npy; the best of `--repeats` rounds is reported, and the npy figures as ratios against PNG's.

The images are photographic (random crops, scales and flips of matplotlib's bundled
`grace_hopper.jpg`, 512x600), so PNG compresses them as it compresses photos, not as it compresses
flat synthetic discs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_encoding.py [--images 512] [--resolutions 64 128 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from tsvae_dist.data import shardformat
from tsvae_dist.data.prefetch import decode_image_shard
from tsvae_dist.data.writer import ShardWriter, finish_dataset


def photo_crops(n: int, resolution: int, seed: int = 0) -> list[np.ndarray]:
    """`n` uint8 HWC RGB images: random square crops (45-100 % of the short side) of a photograph,
    randomly flipped, resized with Lanczos to `resolution`."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        photo = img.convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = photo.size
    out = []
    for _ in range(n):
        side = int(rng.uniform(0.45, 1.0) * min(w, h))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((resolution, resolution),
                                                                       Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop))
    return out


def build(root: str, images: list[np.ndarray], encoding: str, per_shard: int) -> dict:
    with ShardWriter(root, "train", per_shard) as writer:
        for i, image in enumerate(images):
            writer.add(f"train-{i:08d}", {encoding: shardformat.encode_image_as(image, encoding)})
    res = images[0].shape[0]
    return finish_dataset(root, name=f"bench-{encoding}", kind="image", shape=[3, res, res],
                          splits={"train": writer.close()}, source={"bench": encoding})


def decode_rate(root: str, manifest: dict) -> float:
    """Samples/s of decoding every shard of the dataset, one after the other, in this process."""
    start = time.perf_counter()
    n = 0
    for entry in manifest["splits"]["train"]["shards"]:
        keys, _ = decode_image_shard(root, entry, manifest["shape"])
        n += len(keys)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images per resolution")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds; the best of each reported")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions:
            images = photo_crops(args.images, res)
            sets = {}
            for encoding in shardformat.ENCODINGS:
                root = os.path.join(tmp, f"{res}-{encoding}")
                manifest = build(root, images, encoding, args.per_shard)
                size = sum(os.path.getsize(os.path.join(root, *s["name"].split("/")))
                           for s in manifest["splits"]["train"]["shards"])
                sets[encoding] = (root, manifest, size / args.images)
            best = {e: 0.0 for e in sets}
            for _ in range(args.repeats):
                for encoding, (root, manifest, _) in sets.items():
                    best[encoding] = max(best[encoding], decode_rate(root, manifest))
            row = {"resolution": res,
                   **{f"{e}_samples_per_s": round(best[e], 1) for e in sets},
                   **{f"{e}_bytes_per_sample": round(sets[e][2]) for e in sets},
                   "npy_speed_vs_png": round(best["npy"] / best["png"], 2),
                   "npy_bytes_vs_png": round(sets["npy"][2] / sets["png"][2], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| px | PNG samples/s | npy samples/s | npy/PNG speed | PNG bytes/sample | npy bytes/sample "
          "| npy/PNG bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['png_samples_per_s']:,.0f} | {r['npy_samples_per_s']:,.0f} | "
              f"**{r['npy_speed_vs_png']}×** | {r['png_bytes_per_sample']:,} | {r['npy_bytes_per_sample']:,} | "
              f"{r['npy_bytes_vs_png']}× |")


if __name__ == "__main__":
    main()
