"""Build and check datasets in the `tsvae-shards/1` format.

    python -m shards synthetic --out URL [--resolution 32] [--train 8192] [--test 1024]
                               [--samples-per-shard 512] [--seed 0]
    python -m shards mnist   --src DIR --out URL      (train/t10k-images-idx3-ubyte[.gz])
    python -m shards fashion --src DIR --out URL      (the same file names, Fashion-MNIST)
    python -m shards cifar10 --src cifar-10-binary.tar.gz|DIR --out URL
    python -m shards celeba  --src img_align_celeba/|img_align_celeba.zip --out URL
                             [--resolution 64|128] [--crop 128|140] [--partition list_eval_partition.txt]
                             [--upsample]   (256 only upsamples the crop: use celebahq)
    python -m shards celebahq --src CelebA-HQ-img/ --out URL [--resolution 256|128] [--split index|celeba]
                             [--mapping CelebA-HQ-to-CelebA-mapping.txt]
    python -m shards folder  --src DIR --out URL [--resolution 64] [--channels 3] [--test-fraction 0.1]
    python -m shards index   URL [--image-ext jpg] [--resolution N] [--test-shards K]
                             (existing WebDataset shards: a folder, split folders, or a.../s-{000..099}.tar)
    python -m shards verify URL

One subcommand per data source; each builds shards and writes the manifest last. Builders never
download: fetch the raw files first. --out and --src take local paths or fsspec URLs (s3://...).
Every builder takes --encoding png|npy: PNG, or raw uint8 .npy (decoding is a copy; more bytes).
"""

from __future__ import annotations

import argparse
import sys

from tsvae_dist.data import shardformat
from tsvae_dist.errors import DataError


def _synthetic(args: argparse.Namespace) -> None:
    from tsvae_dist.data.synthetic import build_synthetic

    manifest = build_synthetic(args.out, resolution=args.resolution, train=args.train, test=args.test,
                               samples_per_shard=args.samples_per_shard, seed=args.seed, encoding=args.encoding)
    _summary(args.out, manifest)


def _mnist(args: argparse.Namespace) -> None:
    from shards.idx import build_idx

    name = "mnist" if args.command == "mnist" else "fashion"
    _summary(args.out, build_idx(args.src, args.out, name=name, samples_per_shard=args.samples_per_shard,
                                 encoding=args.encoding))


def _cifar10(args: argparse.Namespace) -> None:
    from shards.cifar10 import build_cifar10

    _summary(args.out, build_cifar10(args.src, args.out, samples_per_shard=args.samples_per_shard,
                                     encoding=args.encoding))


def _celeba(args: argparse.Namespace) -> None:
    from shards.celeba import build_celeba

    _summary(args.out, build_celeba(args.src, args.out, resolution=args.resolution, crop=args.crop,
                                    partition=args.partition, samples_per_shard=args.samples_per_shard,
                                    workers=args.workers, encoding=args.encoding, upsample=args.upsample))


def _celebahq(args: argparse.Namespace) -> None:
    from shards.celebahq import build_celebahq

    _summary(args.out, build_celebahq(args.src, args.out, resolution=args.resolution, split=args.split,
                                      mapping=args.mapping, expect_images=args.expect_images,
                                      samples_per_shard=args.samples_per_shard, workers=args.workers,
                                      encoding=args.encoding))


def _folder(args: argparse.Namespace) -> None:
    from shards.folder import build_folder

    _summary(args.out, build_folder(args.src, args.out, resolution=args.resolution, channels=args.channels,
                                    test_fraction=args.test_fraction, name=args.name,
                                    samples_per_shard=args.samples_per_shard, workers=args.workers,
                                    encoding=args.encoding))


def _index(args: argparse.Namespace) -> None:
    from shards.index import index_webdataset

    manifest = index_webdataset(args.url, image_ext=args.image_ext, resolution=args.resolution,
                                test_shards=args.test_shards, name=args.name, workers=args.workers)
    root = shardformat.dataset_root(manifest_root(args.url))
    _summary(root, manifest)
    if "test" not in manifest["splits"]:
        print("note: no 'test' split: training works, but the encode and evaluate stages need one "
              "(--test-shards K, or a test/ folder of shards)")


def manifest_root(url: str) -> str:
    """The directory an index manifest goes to: the URL itself, or the folder of a .tar pattern."""
    return url.rsplit("/", 1)[0] if url.endswith(".tar") and "/" in url else url


def _verify(args: argparse.Namespace) -> None:
    """Read every shard, check hash and count, and decode every sample."""
    root = shardformat.dataset_root(args.url)
    manifest = shardformat.read_manifest(root)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            url = shardformat.shard_url(root, shard["name"])
            for key, files in shardformat.iter_tar(url, sha256=shard["sha256"], count=shard["count"]):
                shardformat.decode_sample(url, key, files, manifest["kind"], manifest["shape"],
                                          manifest.get("decode"))
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards OK")
    _summary(root, manifest)


def _summary(root: str, manifest: dict) -> None:
    splits = ", ".join(f"{s} {e['count']} samples / {len(e['shards'])} shards"
                       for s, e in manifest["splits"].items())
    print(f"{root}: {manifest['name']} ({manifest['kind']} {manifest['dtype']} {manifest['shape']}): "
          f"{splits}")


def add_encoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding", default="png", choices=shardformat.ENCODINGS,
                   help="how samples are stored: png (compression 6: small, a few ms to decode at 256 px) or npy "
                   "(raw uint8: decoding is a copy, several times the bytes; benchmarks/RESULTS.md)")


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
    add_encoding(p)
    p.set_defaults(run=_synthetic)

    def source_parser(name: str, help: str, src_help: str, per_shard: int = 1000) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--src", required=True, help=src_help)
        p.add_argument("--out", required=True, help="dataset directory URL (local path or fsspec URL)")
        p.add_argument("--samples-per-shard", type=int, default=per_shard, help="samples per tar shard")
        add_encoding(p)
        return p

    for name, what in (("mnist", "MNIST"), ("fashion", "Fashion-MNIST")):
        p = source_parser(name, f"{what} from the official idx files: 60,000 train / 10,000 test, 28x28 grey",
                          "folder holding train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz")
        p.set_defaults(run=_mnist)
    p = source_parser("cifar10", "CIFAR-10 from the binary version: 50,000 train / 10,000 test, 32x32 RGB",
                      "cifar-10-binary.tar.gz, or the folder cifar-10-batches-bin (or its parent)")
    p.set_defaults(run=_cifar10)
    p = source_parser("celeba", "CelebA aligned images: the paper's 128x128 crop, resized with an antialiased "
                      "filter", "the folder img_align_celeba or img_align_celeba.zip")
    p.add_argument("--resolution", type=int, default=64, choices=(64, 128, 256), help="output side in pixels")
    p.add_argument("--crop", type=int, default=128, choices=(128, 140),
                   help="128: rows 45:173, cols 25:153 (the paper's); 140: the 140x140 centre")
    p.add_argument("--partition", default="", help="list_eval_partition.txt (default: the official split "
                   "by image number)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding and resizing images")
    p.add_argument("--upsample", action="store_true", help="allow a resolution above the crop (upsampling it; "
                   "for 256-px faces build celebahq instead)")
    p.set_defaults(run=_celeba)
    p = source_parser("celebahq", "CelebA-HQ: 30,000 faces from a folder of 1024-px (or 512/256-px) PNG/JPEG "
                      "files numbered 0-29999, resized with an antialiased filter",
                      "the folder of images (e.g. CelebA-HQ-img/)")
    p.add_argument("--resolution", type=int, default=256, choices=(32, 64, 128, 256, 512, 1024),
                   help="output side in pixels (never above the images' own)")
    p.add_argument("--split", default="index", choices=("index", "celeba"),
                   help="index: images 0-26999 train, 27000-29999 test (Glow's 27k/3k); celeba: CelebA's official "
                   "identity-disjoint partition of each image's source, through --mapping")
    p.add_argument("--mapping", default="", help="CelebA-HQ-to-CelebA-mapping.txt (for --split celeba)")
    p.add_argument("--expect-images", type=int, default=30000, help="how many images the folder must hold")
    p.add_argument("--workers", type=int, default=1, help="processes decoding and resizing images")
    p.set_defaults(run=_celebahq)
    p = source_parser("folder", "any folder of images (recursive): centre square, antialiased resize",
                      "the folder of images")
    p.add_argument("--resolution", type=int, default=64, help="output side in pixels")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1: grey, 3: RGB")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="expected share of the test split, chosen by a hash of each path (default 0.1); only "
                   "without train/ and test/ (or val/) subfolders, whose split is used when present")
    p.add_argument("--name", default="folder", help="dataset name recorded in the manifest")
    p.add_argument("--workers", type=int, default=1, help="processes decoding and resizing images")
    p.set_defaults(run=_folder)

    p = sub.add_parser("index", help="write a manifest beside existing WebDataset shards (no copy), after "
                       "decoding every sample")
    p.add_argument("url", help="folder of .tar shards (or of split folders train/, test/, ...), or a pattern "
                   "'.../shard-{000000..000099}.tar'")
    p.add_argument("--image-ext", default="", help="the member holding the image (jpg, png, ...); default: "
                   "the one image member each sample has")
    p.add_argument("--resolution", type=int, default=0, help="resize to N x N as the shards are read (centre "
                   "square, Lanczos); 0: keep the stored size")
    p.add_argument("--test-shards", type=int, default=0, help="in a flat folder: the last K shards (sorted) "
                   "form the test split")
    p.add_argument("--name", default="", help="dataset name recorded in the manifest (default: the folder's)")
    p.add_argument("--workers", type=int, default=1, help="processes reading and decoding shards")
    p.set_defaults(run=_index)

    p = sub.add_parser("verify", help="check every shard's hash and count and decode every sample")
    p.add_argument("url", help="dataset directory or manifest URL")
    p.set_defaults(run=_verify)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except DataError as e:  # bad input: a user error, exit 2 as for every command of the project
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
