"""MNIST and Fashion-MNIST from their official idx files (gzipped or not), 28×28 grey images.

Splits as the papers use them: the 60,000 training images (`train-images-idx3-ubyte.gz`) and the
10,000 test images (`t10k-images-idx3-ubyte.gz`); Fashion-MNIST ships files of the same names.
Labels are not needed by the VAE and are not read.
"""

from __future__ import annotations

import gzip

import numpy as np

from shards.common import check_encoding, check_positive, encoded, input_record, read_input, write_split
from tsvae_dist import storage
from tsvae_dist.data.writer import finish_dataset
from tsvae_dist.errors import DataError

BUILDER = "idx/1"
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_DTYPES = {0x08: np.uint8}  # the idx type codes we accept (images are unsigned bytes)


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """The array in an idx file (gzipped or raw): magic 0 0 <type> <ndim>, big-endian int32 dims, data."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{where}: corrupt gzip ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{where}: not an idx file (bad magic {data[:4].hex()})")
    type_code, ndim = data[2], data[3]
    if type_code not in _DTYPES:
        raise DataError(f"{where}: idx type 0x{type_code:02x}; expected 0x08 (unsigned bytes)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated idx header")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"{where}: {len(data)} bytes; dims {dims} need {expected} (truncated or padded)")
    return np.frombuffer(data, dtype=_DTYPES[type_code], offset=header).reshape(dims)


def _find(src: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        url = storage.join(src, name)
        if storage.exists(url):
            return url
    raise DataError(f"{storage.join(src, stem + '.gz')}: input file missing (download the raw files first; "
                    "builders never download)")


def build_idx(src: str, out: str, *, name: str, samples_per_shard: int = 1000, encoding: str = "png") -> dict:
    """Shards of the idx image files in `src` (MNIST or Fashion-MNIST); returns the manifest."""
    check_positive(name, samples_per_shard=samples_per_shard)
    check_encoding(name, encoding)
    splits, inputs = {}, []
    shape = None
    for split, stem in IMAGE_FILES.items():
        url = _find(src, stem)
        data = read_input(url)
        images = parse_idx(data, url)
        if images.ndim != 3:
            raise DataError(f"{url}: expected images [N,H,W], got dims {list(images.shape)}")
        if shape is not None and images.shape[1:] != shape:
            raise DataError(f"{url}: images of {list(images.shape[1:])}, the training images are {list(shape)}")
        shape = images.shape[1:]
        inputs.append(input_record(url, data))
        samples = ((f"{split}-{i:08d}", encoded(images[i], encoding)) for i in range(len(images)))
        splits[split] = write_split(out, split, samples, samples_per_shard, ext=encoding)
    source = {"builder": BUILDER, "dataset": name, "inputs": inputs, "encoding": encoding,
              "splits": "official: train = train-images (all), test = t10k-images (all)"}
    return finish_dataset(out, name=name, kind="image", shape=[1, int(shape[0]), int(shape[1])], splits=splits,
                          source=source)
