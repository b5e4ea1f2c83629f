"""Build and check datasets in the `tsvae-shards/1` format.

    python -m shards synthetic --out URL [--resolution 32] [--train 8192] [--test 1024]
                               [--samples-per-shard 512] [--seed 0]
    python -m shards verify URL

One subcommand per data source; each builds shards and writes the manifest last.
"""

from __future__ import annotations

import argparse
import sys

from tsvae_dist import shardformat
from tsvae_dist.errors import DataError


def _synthetic(args: argparse.Namespace) -> None:
    from shards.synthetic import build_synthetic

    manifest = build_synthetic(args.out, resolution=args.resolution, train=args.train, test=args.test,
                               samples_per_shard=args.samples_per_shard, seed=args.seed)
    _summary(args.out, manifest)


def _verify(args: argparse.Namespace) -> None:
    """Read every shard, check hash and count, and decode every sample."""
    root = shardformat.dataset_root(args.url)
    manifest = shardformat.read_manifest(root)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            url = shardformat.shard_url(root, shard["name"])
            for key, files in shardformat.iter_tar(url, sha256=shard["sha256"], count=shard["count"]):
                shardformat.decode_sample(url, key, files, manifest["kind"], manifest["shape"])
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards OK")
    _summary(root, manifest)


def _summary(root: str, manifest: dict) -> None:
    splits = ", ".join(f"{s} {e['count']} samples / {len(e['shards'])} shards"
                       for s, e in manifest["splits"].items())
    print(f"{root}: {manifest['name']} ({manifest['kind']} {manifest['dtype']} {manifest['shape']}): "
          f"{splits}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="soft discs with 4 factors (x, y, radius, hue): intrinsic dim 4")
    p.add_argument("--out", required=True, help="dataset directory URL (local path or fsspec URL)")
    p.add_argument("--resolution", type=int, default=32, help="image height and width in pixels")
    p.add_argument("--train", type=int, default=8192, help="training samples")
    p.add_argument("--test", type=int, default=1024, help="test samples")
    p.add_argument("--samples-per-shard", type=int, default=512, help="samples per tar shard")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.set_defaults(run=_synthetic)

    p = sub.add_parser("verify", help="check every shard's hash and count and decode every sample")
    p.add_argument("url", help="dataset directory or manifest URL")
    p.set_defaults(run=_verify)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
