"""The shard format `tsvae-shards/1`: manifest, sample codec and tar reading.

A dataset is a directory URL holding `manifest.json` and WebDataset-style tar shards
(`train/shard-000000.tar`, ..., `test/shard-000000.tar`, ...). The manifest is written last and
atomically, so its presence means every shard it lists is complete; it records each shard's sample
count and SHA-256, which readers check (a tar truncated exactly at a member boundary parses cleanly,
so only the hash or the count can catch it).

Samples are groups of tar members sharing a key (the member name up to its first dot):
- images: `<key>.png` (also `.jpg`/`.jpeg`, or `.npy` holding uint8 HWC), decoded to uint8 [C,H,W];
- latents: `<key>.mu.npy` and `<key>.logsigma.npy`, float32 [κ] each.
Only these are decoded, through PIL or `np.load(..., allow_pickle=False)`: nothing is ever unpickled,
and any other extension is a DataError naming the shard and the key.

WebDataset shards written by other tools (`python -m shards index`) are read where they lie: their
manifest names the shards relative to its own directory, and its optional `decode` field says how to
read their samples: `{"image": "jpg"}` takes the image from that member and ignores the sample's other
members (`.cls`, `.json`, `.txt`, ...); `"resize_from": [C, H, W]` says the images are stored at that
shape and are resized to the manifest's `shape` as they are read (largest centred square, Lanczos,
antialiased: the builders' own preprocessing), so the stored shape is still checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import tokenize
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from tsvae_dist import storage
from tsvae_dist.errors import DataError

FORMAT = "tsvae-shards/1"
MANIFEST_NAME = "manifest.json"
KINDS = {"image": "uint8", "latent": "float32"}  # kind -> the dtype its samples have
IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")
LATENT_EXTS = ("logsigma.npy", "mu.npy")
# A sample key: '/'-separated segments of letters, digits, '_' and '-' (no dots: a member's extension
# starts at the first dot of its base name). The writer and the reader both hold keys to this rule.
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
EXT_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")  # an extension: dot-separated words
# A shard's name: a path relative to the manifest's directory ending in .tar (our writer's are
# `<split>/shard-NNNNNN.tar`; indexed WebDataset shards keep their own names), no '.' or '..' segments.
_SHARD_RE = re.compile(r"^([A-Za-z0-9_\-][A-Za-z0-9_.\-]*/)*[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\.tar$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

Sample = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Manifest


def dataset_root(url: str) -> str:
    """The dataset directory for either the directory URL itself or the URL of its manifest.json."""
    stripped = url.rstrip("/")
    if stripped.endswith("/" + MANIFEST_NAME) or stripped == MANIFEST_NAME:
        return stripped[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return stripped or url


def manifest_url(root_url: str) -> str:
    return storage.join(dataset_root(root_url), MANIFEST_NAME)


def shard_url(root_url: str, name: str) -> str:
    """The URL of shard `name` (e.g. `train/shard-000003.tar`) of the dataset at `root_url`."""
    return storage.join(dataset_root(root_url), *name.split("/"))


def _check(cond: bool, where: str, key: str, msg: str) -> None:
    if not cond:
        raise DataError(f"{where}: {key}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> dict:
    """Check a manifest's structure and consistency; DataError naming `where` and the key at fault."""
    _check(isinstance(manifest, dict), where, "<root>", "expected a JSON object")
    for field in ("format", "name", "kind", "shape", "dtype", "splits", "source"):
        _check(field in manifest, where, field, "missing")
    _check(manifest["format"] == FORMAT, where, "format", f"expected {FORMAT!r}, got {manifest['format']!r}")
    _check(isinstance(manifest["name"], str) and manifest["name"] != "", where, "name",
           "expected a non-empty string")
    kind = manifest["kind"]
    _check(kind in KINDS, where, "kind", f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    _check(manifest["dtype"] == KINDS[kind], where, "dtype", f"kind {kind!r} needs dtype {KINDS[kind]!r}")
    shape = manifest["shape"]
    _check(isinstance(shape, list) and all(_is_int(s) and s > 0 for s in shape), where, "shape",
           "expected a list of positive integers")
    if kind == "image":
        _check(len(shape) == 3 and shape[0] in (1, 3), where, "shape",
               f"images need [C,H,W] with C 1 or 3, got {shape}")
    else:
        _check(len(shape) == 1, where, "shape", f"latents need [kappa], got {shape}")
    _check(isinstance(manifest["source"], dict), where, "source", "expected an object")
    if "decode" in manifest:
        _validate_decode(manifest["decode"], kind, shape, where)
    splits = manifest["splits"]
    _check(isinstance(splits, dict) and len(splits) > 0, where, "splits", "expected a non-empty object")
    names: set[str] = set()
    for split, entry in splits.items():
        key = f"splits.{split}"
        _check(re.fullmatch(r"[A-Za-z0-9_\-]+", split) is not None, where, key, "bad split name")
        _check(isinstance(entry, dict), where, key, "expected an object")
        _check(_is_int(entry.get("count")) and entry["count"] > 0, where, key + ".count",
               "expected a positive integer")
        shards = entry.get("shards")
        _check(isinstance(shards, list) and len(shards) > 0, where, key + ".shards",
               "expected a non-empty list")
        for i, sh in enumerate(shards):
            skey = f"{key}.shards[{i}]"
            _check(isinstance(sh, dict), where, skey, "expected an object")
            name = sh.get("name")
            _check(isinstance(name, str) and _SHARD_RE.match(name) is not None, where, skey + ".name",
                   f"expected a relative path '<dir>/<name>.tar' ('{split}/<name>.tar'), got {name!r}")
            top = name.split("/", 1)[0] if "/" in name else None
            _check(top is None or top == split or top not in splits, where, skey + ".name",
                   f"shard {name!r} of split {split!r} lies in the folder of split {top!r}")
            _check(name not in names, where, skey + ".name", f"duplicate shard {name!r}")
            names.add(name)
            _check(_is_int(sh.get("count")) and sh["count"] > 0, where, skey + ".count",
                   "expected a positive integer")
            _check(isinstance(sh.get("sha256"), str) and _HEX64_RE.match(sh["sha256"]) is not None,
                   where, skey + ".sha256", "expected 64 lower-case hex digits")
        total = sum(sh["count"] for sh in shards)
        _check(total == entry["count"], where, key + ".count",
               f"{entry['count']} != {total}, the sum over its shards")
    return manifest


def _validate_decode(decode: Any, kind: str, shape: list[int], where: str) -> None:
    _check(kind == "image" and isinstance(decode, dict), where, "decode", "expected an object, for images only")
    unknown = sorted(set(decode) - {"image", "resize_from"})
    _check(not unknown, where, "decode", f"unknown field(s) {unknown}")
    _check(decode.get("image") in IMAGE_EXTS, where, "decode.image", f"expected one of {list(IMAGE_EXTS)}, "
           f"got {decode.get('image')!r}")
    if "resize_from" in decode:
        stored = decode["resize_from"]
        _check(isinstance(stored, list) and len(stored) == 3 and all(_is_int(s) and s > 0 for s in stored),
               where, "decode.resize_from", f"expected [C,H,W], got {stored!r}")
        _check(stored[0] == shape[0] and shape[1] == shape[2], where, "decode.resize_from",
               f"resizing {stored} needs a square shape with the same channels, got {shape}")


def read_manifest(root_url: str) -> dict:
    """Read and validate the manifest of the dataset at `root_url` (directory or manifest URL)."""
    url = manifest_url(root_url)
    if not storage.exists(url):
        raise DataError(f"{url}: no manifest (dataset missing or not finished writing)")
    try:
        manifest = json.loads(storage.read_text(url))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{url}: not valid JSON ({e})") from e
    return validate_manifest(manifest, url)


def manifest_bytes(manifest: dict) -> bytes:
    """The canonical serialisation (sorted keys): equal manifests give byte-identical files."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_manifest(root_url: str, manifest: dict) -> None:
    """Validate and write the manifest atomically. Call it last: it marks the dataset complete."""
    url = manifest_url(root_url)
    validate_manifest(manifest, url)
    storage.write_bytes_atomic(url, manifest_bytes(manifest))


# ---------------------------------------------------------------------------------------------
# Sample codec


def encode_image(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image, HWC with C 1 or 3 (or HW).

    Deterministic for a given zlib: fixed compression level, no metadata chunks.
    """
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_image: expected uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_image: expected HW, HWx1 or HWx3, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else "RGB").save(
        buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


ENCODINGS = ("png", "npy")  # how builders store images: PNG (compression 6) or raw uint8 HWC .npy


def encode_image_as(arr: np.ndarray, encoding: str) -> bytes:
    """A uint8 image (HW, HWx1 or HWx3) as the member `<key>.<encoding>`: PNG bytes, or `.npy` of the
    uint8 HWC array (no compression: decoding is a copy, at ~3-10x the bytes of a PNG)."""
    if encoding == "png":
        return encode_image(arr)
    if encoding != "npy":
        raise ValueError(f"encode_image_as: encoding {encoding!r} is not one of {ENCODINGS}")
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_image_as: expected uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not (arr.ndim == 3 and arr.shape[2] in (1, 3)):
        raise ValueError(f"encode_image_as: expected HW, HWx1 or HWx3, got shape {arr.shape}")
    return encode_npy(arr)


def encode_npy(arr: np.ndarray) -> bytes:
    """`.npy` bytes of a numeric array (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_latent(mu: np.ndarray, log_sigma: np.ndarray) -> dict[str, bytes]:
    """The files of one latent sample: float32 [κ] posterior mean and log standard deviation."""
    mu = np.asarray(mu, dtype=np.float32)
    log_sigma = np.asarray(log_sigma, dtype=np.float32)
    if mu.ndim != 1 or mu.shape != log_sigma.shape:
        raise ValueError(f"encode_latent: expected two [kappa] vectors, got {mu.shape} and {log_sigma.shape}")
    return {"mu.npy": encode_npy(mu), "logsigma.npy": encode_npy(log_sigma)}


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # header bytes -> (dtype, shape, fortran)


def _npy_header(data: bytes) -> tuple[int, tuple[np.dtype, tuple[int, ...], bool]] | None:
    """(offset of the array data, parsed header) of a version 1 or 2 `.npy`, or None for anything else.

    The header is parsed by numpy (a safe literal parser, ~0.1 ms) once per distinct header and then
    cached: a shard's samples share one or two headers, and parsing them all dominated decoding.
    """
    # (1, 0) and (2, 0) only: numpy refuses other minor versions, so they go to np.load to be refused
    if data[:6] != _NPY_MAGIC or len(data) < 12 or data[6] not in (1, 2) or data[7] != 0:
        return None
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    header = data[:end]
    parsed = _npy_headers.get(header)
    if parsed is None:
        fp = io.BytesIO(header)
        read = np.lib.format.read_array_header_1_0 if data[6] == 1 else np.lib.format.read_array_header_2_0
        np.lib.format.read_magic(fp)
        shape, fortran, dtype = read(fp)  # numpy's own validation
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_npy_headers) < 256:
            _npy_headers[header] = parsed
    return end, parsed


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        found = _npy_header(data)
        if found is None:  # other versions: numpy's reader
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(arr, np.ndarray):  # np.load opens a zip (an .npz) as an NpzFile
                arr.close()
                raise ValueError(f"not a .npy array (numpy reads a {type(arr).__name__})")
            return arr
        offset, (dtype, shape, fortran) = found
        if dtype.hasobject:
            raise ValueError("object arrays cannot be loaded when allow_pickle=False")
        count = int(np.prod(shape, dtype=np.int64))
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(f"{len(data) - offset} data bytes for shape {shape} of {dtype}")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return arr.reshape(shape, order="F" if fortran else "C").copy()  # writable, like np.load's
    # numpy's header parser raises TokenError for unbalanced brackets or quotes; a dimension >= 2**63
    # overflows np.prod (and numpy's own reader)
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, OverflowError) as e:
        raise DataError(f"{where}: unreadable .npy ({e})") from e


_PIL_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",)}


def decode_image(where: str, ext: str, data: bytes, shape: list[int] | None = None) -> np.ndarray:
    """One image member (`ext` one of IMAGE_EXTS) as uint8 [C,H,W]; with `shape` it must have that shape."""
    if ext not in IMAGE_EXTS:
        raise DataError(f"{where}: .{ext} is not an image extension ({list(IMAGE_EXTS)})")
    return _decode_image(where, ext, data, shape)


def _decode_image(where: str, ext: str, data: bytes, shape: list[int] | None) -> np.ndarray:
    if ext == "npy":
        arr = _load_npy(data, where)
        if arr.dtype != np.uint8:
            raise DataError(f"{where}: expected uint8 .npy, got {arr.dtype}")
    else:
        try:
            # only the format the extension names: PIL would otherwise open any format it knows (EPS runs
            # Ghostscript), and indexed shards come from other tools
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS[ext]) as img:
                if img.mode not in ("L", "RGB"):
                    raise DataError(f"{where}: image mode {img.mode!r}; expected 'L' or 'RGB'")
                arr = np.asarray(img)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for corrupt data
            raise DataError(f"{where}: undecodable .{ext} ({type(e).__name__}: {e})") from e
        if arr.ndim == 2:
            arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"{where}: image array of shape {tuple(arr.shape)}; expected HWC")
    if shape is not None and arr.shape != (shape[1], shape[2], shape[0]):
        c, h, w = shape
        raise DataError(f"{where}: image shape {tuple(arr.shape)} (HWC); the manifest says {(h, w, c)}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def resize_square(img: Image.Image, side: int) -> Image.Image:
    """The largest centred square of `img` (odd leftovers go to the right/bottom), resized to `side` with
    Lanczos filtering; Pillow widens the filter by the scale factor when shrinking (antialiased)."""
    w, h = img.size
    if (w, h) == (side, side):
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    return img.resize((side, side), Image.Resampling.LANCZOS, reducing_gap=None)


def _resized(arr: np.ndarray, side: int) -> np.ndarray:
    """uint8 HWC `arr` through `resize_square`."""
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    out = np.asarray(resize_square(img, side))
    return out[:, :, None] if out.ndim == 2 else out


def decode_sample(shard_url: str, key: str, files: dict[str, bytes], kind: str, shape: list[int],
                  decode: dict | None = None) -> Sample:
    """Decode one sample's files into numpy arrays, checking extensions, shape and dtype.

    Returns {"image": uint8 [C,H,W]} for images, {"mu", "log_sigma": float32 [κ]} for latents.
    `decode` is the manifest's optional field of that name (indexed WebDataset shards, module docstring).
    """
    where = f"{shard_url}: sample {key!r}"
    if kind == "image" and decode is not None:
        ext = decode["image"]
        if ext not in files:
            raise DataError(f"{where}: no .{ext} member (has {sorted(files)}); the manifest reads images from .{ext}")
        stored = decode.get("resize_from")
        if stored is None:
            return {"image": _decode_image(where, ext, files[ext], shape)}
        arr = _decode_image(where, ext, files[ext], stored).transpose(1, 2, 0)
        return {"image": np.ascontiguousarray(_resized(arr, shape[1]).transpose(2, 0, 1))}
    if kind == "image":
        unknown = sorted(set(files) - set(IMAGE_EXTS))
        if unknown:
            raise DataError(f"{where}: unknown extension(s) {unknown}; images need one of {list(IMAGE_EXTS)}")
        if len(files) != 1:
            raise DataError(f"{where}: {len(files)} image files {sorted(files)}; expected exactly one")
        (ext, data), = files.items()
        return {"image": _decode_image(where, ext, data, shape)}
    if kind == "latent":
        if sorted(files) != list(LATENT_EXTS):
            raise DataError(f"{where}: files {sorted(files)}; latents need exactly {list(LATENT_EXTS)}")
        out = {}
        for ext, name in (("mu.npy", "mu"), ("logsigma.npy", "log_sigma")):
            arr = _load_npy(files[ext], f"{where}.{ext}")
            if arr.dtype != np.float32 or list(arr.shape) != list(shape):
                raise DataError(f"{where}.{ext}: {arr.dtype} {list(arr.shape)}; "
                                f"the manifest says float32 {shape}")
            out[name] = arr
        return out
    raise DataError(f"{shard_url}: unknown kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Tar shards


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key ends at the first dot of the base name."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, (ext if dot else "")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ZERO_BLOCK = bytes(512)


def _field(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _octal(raw: bytes) -> int:
    return int(_field(raw).strip() or b"0", 8)


# mode, uid, gid, mtime, devmajor, devminor: unused here, but tarfile refuses a header where one is not octal
_UNUSED_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))


def _plain_ustar_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, payload) of every regular file of a plain ustar archive, or None when anything is unusual.

    The fast path for the archives our writer makes (Python's tarfile spends ~0.2 ms per member):
    checksummed 512-byte headers, regular files and directories only, then zero blocks. On any
    surprise (another member type, pax or GNU extensions, a bad checksum, a truncation) it returns
    None and tarfile parses the archive, with its checks and error messages.
    """
    out, pos, n = [], 0, len(data)
    if n < 512:  # tarfile refuses an archive without a single header block ("empty file")
        return None
    while pos + 512 <= n:
        block = data[pos:pos + 512]
        if block == _ZERO_BLOCK:
            return out if not data[pos:].strip(b"\0") else None
        magic = block[257:263]
        if magic not in (b"ustar\x00", b"ustar "):
            return None
        try:
            checksum = _octal(block[148:156])
            size = _octal(block[124:136])
            for lo, hi in _UNUSED_NUMBER_FIELDS:
                _octal(block[lo:hi])
            name = _field(block[0:100])
            prefix = _field(block[345:500]) if magic == b"ustar\x00" else b""
            name_str = (prefix + b"/" + name if prefix else name).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        if checksum != sum(block) - sum(block[148:156]) + 8 * 32:  # the field itself counts as 8 spaces
            return None
        start = pos + 512
        if size < 0 or start + size > n:
            return None
        kind = block[156:157]
        # tarfile reads an old-style ('\0') member named 'x/' as a directory; a directory has no data
        # blocks whatever its size field says (tarfile skips none), so one claiming a size is declined
        if kind == b"5" or (kind == b"\0" and name.endswith(b"/")):
            if size != 0:
                return None
        elif kind in (b"0", b"\0"):
            out.append((name_str, data[start:start + size]))
        else:
            return None
        pos = start + (size + 511) // 512 * 512
    return out if pos == n else None


def _tarfile_members(shard_url: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of the regular files of any tar, through tarfile; DataError naming the shard."""
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{shard_url}: not a readable tar ({e})") from e
    last = None
    try:
        for member in tf:
            if member.isdir():
                continue
            if not member.isfile():
                mkey, _ = split_member_name(member.name)
                raise DataError(f"{shard_url}: sample {mkey!r}: member {member.name!r} is not a regular file")
            f = tf.extractfile(member)
            payload = f.read() if f is not None else b""
            if len(payload) != member.size:
                mkey, _ = split_member_name(member.name)
                raise DataError(f"{shard_url}: sample {mkey!r}: truncated member {member.name!r}")
            last = split_member_name(member.name)[0]
            yield member.name, payload
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{shard_url}: corrupt or truncated tar after sample {last!r} ({e})") from e
    # tarfile takes an unreadable member header for the end of the archive: only zeros may follow it
    if data[tf.offset:].strip(b"\0"):
        raise DataError(f"{shard_url}: corrupt or truncated tar after sample {last!r} (unreadable member header "
                        f"at byte {tf.offset})")


def iter_tar_bytes(shard_url: str, data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples (key, {ext: bytes}) of an in-memory tar, in file order; DataError naming the shard."""
    members = _plain_ustar_members(data)
    seen: set[str] = set()
    key, files = None, {}
    for name, payload in (members if members is not None else _tarfile_members(shard_url, data)):
        mkey, ext = split_member_name(name)
        if not ext or not mkey or KEY_RE.match(mkey) is None:
            raise DataError(f"{shard_url}: sample {mkey!r}: bad member name {name!r}")
        if mkey != key:
            if key is not None:
                yield key, files
            if mkey in seen:
                raise DataError(f"{shard_url}: sample {mkey!r}: key appears twice (members not grouped)")
            seen.add(mkey)
            key, files = mkey, {}
        if ext in files:
            raise DataError(f"{shard_url}: sample {mkey!r}: duplicate file .{ext}")
        files[ext] = payload
    if key is not None:
        yield key, files


def read_shard(shard_url: str, sha256: str | None = None) -> bytes:
    """The whole shard (one request: the fastest read on object stores), checked against `sha256` if given."""
    try:
        data = storage.read_bytes(shard_url)
    except FileNotFoundError as e:
        raise DataError(f"{shard_url}: shard missing") from e
    if sha256 is not None and sha256_hex(data) != sha256:
        raise DataError(f"{shard_url}: sha256 {sha256_hex(data)[:16]}... differs from the manifest's "
                        f"{sha256[:16]}... (corrupt or truncated shard)")
    return data


def iter_tar(shard_url: str, sha256: str | None = None, count: int | None = None
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples (key, {ext: bytes}) of the shard at `shard_url`, in file order.

    With `sha256` the bytes are checked against it; with `count` the number of samples is, after
    the last one (a mismatch is a DataError naming the shard).
    """
    data = read_shard(shard_url, sha256)
    n = 0
    for item in iter_tar_bytes(shard_url, data):
        n += 1
        yield item
    if count is not None and n != count:
        raise DataError(f"{shard_url}: {n} samples; the manifest says {count}")
