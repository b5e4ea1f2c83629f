"""CIFAR-10 from the official *binary* version (`cifar-10-binary.tar.gz` or its extracted folder).

Each record is 3,073 bytes: a label byte, then the 32×32 red, green and blue planes, row-major. The
Python version is never read (it is pickled). Splits as in the paper: the 50,000 images of
data_batch_1..5 for training and the 10,000 of test_batch for testing.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

from shards.common import check_encoding, check_positive, encoded, input_record, read_input, write_split
from tsvae_dist import storage
from tsvae_dist.data.writer import finish_dataset
from tsvae_dist.errors import DataError

BUILDER = "cifar10-binary/1"
RECORD = 1 + 3 * 32 * 32
BATCHES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
FOLDER = "cifar-10-batches-bin"


def parse_records(data: bytes, where: str) -> np.ndarray:
    """uint8 [N,32,32,3] images of a CIFAR-10 binary batch file."""
    if len(data) == 0 or len(data) % RECORD:
        raise DataError(f"{where}: {len(data)} bytes is not a whole number of {RECORD}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    if records[:, 0].max() > 9:
        raise DataError(f"{where}: label byte {int(records[:, 0].max())} > 9: not a CIFAR-10 binary batch")
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _batch_files(src: str) -> tuple[dict[str, bytes], list[dict]]:
    """{file name: bytes} of the batch files, from the tar.gz, its extracted folder, or the folder's parent."""
    wanted = [n for names in BATCHES.values() for n in names]
    if src.endswith((".tar.gz", ".tgz", ".tar")):
        data = read_input(src)
        found = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for member in tf:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted:
                        f = tf.extractfile(member)
                        found[base] = f.read() if f is not None else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{src}: unreadable archive ({e})") from e
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise DataError(f"{src}: no {', '.join(missing)} inside; is this cifar-10-binary.tar.gz?")
        return found, [input_record(src, data)]
    folder = src
    if not storage.exists(storage.join(folder, wanted[0])) and storage.exists(storage.join(src, FOLDER, wanted[0])):
        folder = storage.join(src, FOLDER)
    found, inputs = {}, []
    for name in wanted:
        url = storage.join(folder, name)
        found[name] = read_input(url)
        inputs.append(input_record(url, found[name]))
    return found, inputs


def build_cifar10(src: str, out: str, *, samples_per_shard: int = 1000, encoding: str = "png") -> dict:
    """Shards of CIFAR-10 (binary version at `src`: the .tar.gz or the folder); returns the manifest."""
    check_positive("cifar10", samples_per_shard=samples_per_shard)
    check_encoding("cifar10", encoding)
    files, inputs = _batch_files(src)
    splits = {}
    for split, names in BATCHES.items():
        images = np.concatenate([parse_records(files[n], f"{src}: {n}") for n in names])
        samples = ((f"{split}-{i:08d}", encoded(images[i], encoding)) for i in range(len(images)))
        splits[split] = write_split(out, split, samples, samples_per_shard, ext=encoding)
    source = {"builder": BUILDER, "dataset": "cifar10", "inputs": inputs, "encoding": encoding,
              "splits": "official: train = data_batch_1..5, test = test_batch"}
    return finish_dataset(out, name="cifar10", kind="image", shape=[3, 32, 32], splits=splits, source=source)
