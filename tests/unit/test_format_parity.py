"""Parity of the fast shard parsers with the libraries they stand in for, on the same bytes.

`_plain_ustar_members` must return exactly the regular files Python's tarfile reads, or None (then
`iter_tar_bytes` falls back to tarfile); `_load_npy` must return what `numpy.load(...,
allow_pickle=False)` returns, or raise DataError naming the sample whenever numpy refuses the bytes.
"""

from __future__ import annotations

import io
import random
import re
import tarfile

import numpy as np
import pytest

from tsvae_dist.data.shardformat import _load_npy, _npy_header, _plain_ustar_members, iter_tar_bytes, split_member_name
from tsvae_dist.errors import DataError

URL = "memory://parity/train/shard-000000.tar"
WHERE = "memory://parity/train/shard-000000.tar: sample 'k'.mu.npy"
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-"


# ---------------------------------------------------------------------------------------------
# Tar helpers: building archives and reading them through tarfile alone


class Refused(Exception):
    """tarfile cannot read the archive, or it holds something the fast path must never accept."""


def make_tar(members: list[tuple], fmt: int = tarfile.USTAR_FORMAT) -> tuple[bytes, int]:
    """(archive bytes, offset of the end-of-archive blocks) of `members`: (name, payload) for a regular
    file, (name, None) for a directory, (name, "sym"/"hard", target) for links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for member in members:
            name, payload = member[0], member[1]
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if payload is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif isinstance(payload, str):
                info.type = tarfile.SYMTYPE if payload == "sym" else tarfile.LNKTYPE
                info.linkname = member[2]
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
        end = tf.offset
    return buf.getvalue(), end


def header_offsets(data: bytes) -> list[int]:
    """Offsets of the member headers of a well-formed archive, through tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [m.offset for m in tf.getmembers()]


def fix_checksum(data: bytes, header_at: int) -> bytes:
    """`data` with the checksum of the header at `header_at` recomputed (a crafted, self-consistent header)."""
    d = bytearray(data)
    block = d[header_at:header_at + 512]
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    d[header_at:header_at + 512] = block
    return bytes(d)


def patch_header(data: bytes, header_at: int, field_at: int, value: bytes) -> bytes:
    d = bytearray(data)
    d[header_at + field_at:header_at + field_at + len(value)] = value
    return fix_checksum(bytes(d), header_at)


def tarfile_files(data: bytes) -> list[tuple[str, bytes]]:
    """(name, payload) of the regular files as tarfile reads them; Refused for anything else."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            out = []
            for m in tf:
                if m.isdir():
                    continue
                if not m.isfile():
                    raise Refused(f"member {m.name!r} has type {m.type!r}")
                payload = tf.extractfile(m).read()
                if len(payload) != m.size:
                    raise Refused(f"member {m.name!r}: {len(payload)} of {m.size} bytes")
                out.append((m.name, payload))
            end = tf.offset
    except (tarfile.TarError, EOFError, OSError) as e:
        raise Refused(f"tarfile: {e}") from e
    if data[end:].strip(b"\0"):  # tarfile stops quietly at an unreadable header
        raise Refused(f"non-zero bytes after tarfile's end of archive at byte {end}")
    return out


def reference_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """The samples a tarfile-based reader gets: consecutive members grouped by key."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name, payload in tarfile_files(data):
        key, ext = split_member_name(name)
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = payload
    return samples


def assert_fast_path_agrees_or_declines(data: bytes) -> list[tuple[str, bytes]] | None:
    """The fast path either returns None or exactly tarfile's regular files."""
    fast = _plain_ustar_members(data)
    if fast is not None:
        assert fast == tarfile_files(data)
    return fast


def assert_iter_tar_bytes_agrees_or_raises(data: bytes) -> list | None:
    """`iter_tar_bytes` yields the tarfile-based samples, or raises DataError naming the shard."""
    try:
        got = list(iter_tar_bytes(URL, data))
    except DataError as e:
        assert URL in str(e)
        return None
    assert got == reference_samples(data)
    return got


def plain_members() -> list[tuple]:
    """Every case of a plain archive: a directory, an empty file, payloads around the block size."""
    return [
        ("sub", None),
        ("sub/a-0.png", b"p" * 1),
        ("sub/a-0.cls", b""),
        ("b_1.mu.npy", bytes(range(256)) * 2),  # exactly one block
        ("b_1.logsigma.npy", b"x" * 511),
        ("c-2.png", b"y" * 513),  # two blocks, the second nearly empty
        ("d-3.png", bytes(random.Random(3).randbytes(5000))),  # many blocks
    ]


def random_members(rng: random.Random, n: int) -> list[tuple]:
    """Unique keys from [a-z0-9_-] in one to three path components (long ones need the ustar prefix)."""
    members: list[tuple] = []
    for i in range(n):
        parts = ["".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(1, 50))) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.15:
            members.append(("/".join(parts[:-1] or parts) + f"{i}", None))
            continue
        name = "/".join(parts) + f"{i}.{rng.choice(['png', 'cls', 'mu.npy'])}"
        members.append((name, rng.randbytes(rng.randint(0, 3000))))
    return members


# ---------------------------------------------------------------------------------------------
# Tar: well-formed archives


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_archive_read_by_fast_path_matches_tarfile(fmt):
    """Plain archives in all three formats (none needs an extension header) take the fast path, and it
    returns tarfile's regular files (directories skipped, empty and multi-block payloads exact)."""
    data, _ = make_tar(plain_members(), FORMATS[fmt])
    fast = _plain_ustar_members(data)
    assert fast is not None
    assert fast == tarfile_files(data)
    assert [name for name, _ in fast] == [m[0] for m in plain_members() if m[1] is not None]
    assert assert_iter_tar_bytes_agrees_or_raises(data) == reference_samples(data)


def test_long_ustar_names_use_the_prefix_field():
    """Names over 100 bytes are split into ustar's prefix and name fields; the fast path joins them back."""
    long_dir = "d" * 90 + "/" + "e" * 60
    members = [(f"{long_dir}/k{i}.png", bytes([i]) * (i * 300)) for i in range(3)]
    data, _ = make_tar(members, tarfile.USTAR_FORMAT)
    assert data[345:500].strip(b"\0")  # the case under test really uses the prefix field
    fast = _plain_ustar_members(data)
    assert fast is not None and [n for n, _ in fast] == [m[0] for m in members]
    assert fast == tarfile_files(data)
    assert_iter_tar_bytes_agrees_or_raises(data)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_long_names_in_extension_headers_fall_back_to_tarfile(fmt):
    """GNU longname and pax headers are outside the fast path: it declines and tarfile reads the names."""
    name = "z" * 150 + ".png"
    data, _ = make_tar([(name, b"payload"), ("short.png", b"s")], FORMATS[fmt])
    assert assert_fast_path_agrees_or_declines(data) is None
    assert [k for k, _ in list(iter_tar_bytes(URL, data))] == ["z" * 150, "short"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_ascii_name_is_read_like_tarfile(fmt):
    """A UTF-8 name (pax needs an extension header for it) gives tarfile's name or a fallback."""
    data, _ = make_tar([("ключ.png", b"1")], FORMATS[fmt])
    fast = assert_fast_path_agrees_or_declines(data)
    assert fast is None or fast == [("ключ.png", b"1")]


def test_empty_archive_has_no_members():
    """tarfile's empty archive (only end blocks and padding) is an empty list on both sides."""
    data, _ = make_tar([])
    assert _plain_ustar_members(data) == [] == tarfile_files(data)
    assert list(iter_tar_bytes(URL, data)) == []


@pytest.mark.parametrize("tail", ["none", "two-blocks", "full-record", "extra-blocks", "odd-zeros"])
def test_trailing_zero_padding_variants(tail):
    """However many zeros end the archive (none, the two end blocks, tarfile's 10 KiB record, more, or a
    number that is not a multiple of 512 after the end blocks), the fast path reads the members."""
    data, end = make_tar(plain_members())
    data = {"none": data[:end], "two-blocks": data[:end + 1024], "full-record": data,
            "extra-blocks": data + bytes(8192), "odd-zeros": data + bytes(100)}[tail]
    fast = _plain_ustar_members(data)
    assert fast is not None
    assert fast == tarfile_files(data)


def test_zeros_shorter_than_a_block_after_the_last_member_fall_back():
    """A partial zero block where the next header would be is not a plain archive: the fast path
    declines and the tarfile reading still yields every sample."""
    data, end = make_tar(plain_members())
    data = data[:end] + bytes(100)
    assert _plain_ustar_members(data) is None
    assert assert_iter_tar_bytes_agrees_or_raises(data) == reference_samples(data)


@pytest.mark.parametrize("seed", range(12))
def test_seeded_random_archives(seed):
    """Random names and sizes (0..3000 bytes) in a random format: parity, and the fast path used for ustar."""
    rng = random.Random(seed)
    fmt = rng.choice(sorted(FORMATS))
    members = random_members(rng, rng.randint(1, 12))
    data, end = make_tar(members, FORMATS[fmt])
    fast = assert_fast_path_agrees_or_declines(data)
    if fmt == "ustar":
        assert fast is not None
    assert assert_iter_tar_bytes_agrees_or_raises(data) is not None
    # and the same archive damaged at a random place
    cut = rng.randrange(1, len(data))
    assert_fast_path_agrees_or_declines(data[:cut])
    assert_iter_tar_bytes_agrees_or_raises(data[:cut])
    flipped = bytearray(data)
    flipped[rng.randrange(0, end)] ^= 1 << rng.randrange(8)
    assert_fast_path_agrees_or_declines(bytes(flipped))
    assert_iter_tar_bytes_agrees_or_raises(bytes(flipped))


def test_gnu_header_atime_field_is_not_a_name_prefix():
    """In a GNU header bytes 345.. hold atime/ctime, not a ustar prefix: the fast path keeps the name.

    (CPython's tarfile reads them as a prefix, giving '00000002322/a.png' here; the fast path follows
    the GNU format, so names cannot depend on a timestamp.)"""
    data, _ = make_tar([("a.png", b"hello")], tarfile.GNU_FORMAT)
    data = patch_header(data, 0, 345, b"%011o\0" % 1234)
    assert _plain_ustar_members(data) == [("a.png", b"hello")]


# ---------------------------------------------------------------------------------------------
# Tar: damaged archives


def three_member_archive() -> tuple[bytes, int]:
    return make_tar([("d", None), ("a-0.png", b"hello"), ("b-1.png", b"w" * 700), ("c-2.cls", b"")])


def test_truncated_at_every_offset():
    """Every truncation (inside a header, a payload, its padding, the end blocks) is either declined by
    the fast path or read exactly as tarfile reads it; `iter_tar_bytes` yields tarfile's samples or
    raises DataError naming the shard. (Offset 0, the empty file, is its own test below.)"""
    data, end = three_member_archive()
    accepted = 0
    for cut in range(1, end + 1024 + 1):
        fast = assert_fast_path_agrees_or_declines(data[:cut])
        accepted += fast is not None
        assert_iter_tar_bytes_agrees_or_raises(data[:cut])
    for cut in range(end + 1024, len(data), 512):
        assert assert_fast_path_agrees_or_declines(data[:cut]) is not None
    assert accepted >= 5  # the member boundaries and the end blocks, not just refusals


def test_truncated_at_a_member_boundary_reads_the_members_before_it():
    """A cut exactly between members is a clean, shorter archive to both readers (only the manifest's
    hash or count catches it): the fast path returns the members before the cut."""
    data, end = three_member_archive()
    offsets = header_offsets(data)
    for i, at in enumerate(offsets[1:], start=1):
        fast = _plain_ustar_members(data[:at])
        assert fast is not None and fast == tarfile_files(data[:at])
        assert len(fast) == i - 1  # the directory is not a file
    assert _plain_ustar_members(data[:end]) == tarfile_files(data)


@pytest.mark.parametrize("where", ["header", "payload", "padding"])
def test_truncated_inside_a_member_is_declined_and_iter_raises(where):
    """A cut inside a member's header, payload or block padding: the fast path declines, and
    `iter_tar_bytes` raises DataError naming the shard (tarfile sees a short member)."""
    data, _ = three_member_archive()
    b_at = header_offsets(data)[2]  # b-1.png: 700 bytes, two blocks
    cut = {"header": b_at + 100, "payload": b_at + 512 + 300, "padding": b_at + 512 + 800}[where]
    assert _plain_ustar_members(data[:cut]) is None
    with pytest.raises(DataError, match=re.escape(URL)):
        list(iter_tar_bytes(URL, data[:cut]))


def test_any_flipped_header_byte_fails_the_checksum():
    """A byte changed anywhere in a header but its checksum field makes the fast path decline; a change
    inside the checksum field is declined or read as tarfile reads it."""
    data, _ = three_member_archive()
    for at in header_offsets(data):
        for i in range(512):
            damaged = bytearray(data)
            damaged[at + i] ^= 0xFF
            damaged = bytes(damaged)
            fast = assert_fast_path_agrees_or_declines(damaged)
            if not 148 <= i < 156:
                assert fast is None, f"byte {i} of the header at {at}"
            assert_iter_tar_bytes_agrees_or_raises(damaged)


@pytest.mark.parametrize("where", ["after-record", "inside-end-blocks", "after-first-end-block"])
def test_garbage_after_the_end_blocks_is_refused(where):
    """Non-zero bytes after the end of the archive: declined by the fast path, DataError from iter."""
    data, end = three_member_archive()
    at = {"after-record": len(data), "inside-end-blocks": end + 700, "after-first-end-block": end + 512}[where]
    data = data[:at] + b"garbage" + data[at + 7:]
    assert _plain_ustar_members(data) is None
    with pytest.raises(DataError, match=re.escape(URL)):
        list(iter_tar_bytes(URL, data))


@pytest.mark.parametrize("kind", ["sym", "hard"])
def test_link_member_is_refused(kind):
    """A symlink or hard link is no sample file: declined by the fast path, DataError naming the shard."""
    data, _ = make_tar([("a-0.png", b"x"), ("b-1.png", kind, "a-0.png")])
    assert _plain_ustar_members(data) is None
    with pytest.raises(DataError, match=re.escape(URL) + r".*not a regular file"):
        list(iter_tar_bytes(URL, data))


@pytest.mark.parametrize("magic", [b"ustaR\x0000", b"\0" * 8, b"gnutar\0\0"])
def test_non_ustar_magic_falls_back_to_tarfile(magic):
    """A header without ustar magic (a v7 archive, say) is declined, and the tarfile fallback, which does
    not check magic, still yields the samples."""
    data, _ = make_tar([("a-0.png", b"x" * 10), ("b-1.png", b"y" * 600)])
    data = patch_header(data, header_offsets(data)[1], 257, magic)
    assert _plain_ustar_members(data) is None
    got = assert_iter_tar_bytes_agrees_or_raises(data)
    assert got == [("a-0", {"png": b"x" * 10}), ("b-1", {"png": b"y" * 600})]


def test_non_utf8_name_is_declined_or_matches():
    """A name that is not UTF-8: the fast path declines; iter raises DataError (bad member name)."""
    data, _ = make_tar([("a-0.png", b"x")])
    data = patch_header(data, 0, 0, b"\xff\xfe.png\0")
    assert _plain_ustar_members(data) is None
    with pytest.raises(DataError, match=re.escape(URL)):
        list(iter_tar_bytes(URL, data))


def test_empty_bytes_are_not_an_archive():
    """Zero bytes (an empty object) are no tar: the fast path must not read them as an empty archive."""
    assert_fast_path_agrees_or_declines(b"")
    with pytest.raises(DataError, match=re.escape(URL) + r".*empty file"):
        list(iter_tar_bytes(URL, b""))


def test_directory_with_a_size_hides_no_member():
    """A directory header with a non-zero size field has no data blocks: the member after it is read."""
    data, _ = make_tar([("d", None), ("a-0.png", b"hi"), ("b-1.png", b"yo")])
    data = patch_header(data, 0, 124, b"%011o\0" % 1024)
    assert assert_fast_path_agrees_or_declines(data) != [("b-1.png", b"yo")]


def test_old_style_directory_entry_is_a_directory():
    """A type '\\0' header whose name ends in '/' is a directory, as tarfile reads it."""
    data, _ = make_tar([("d", None), ("a-0.png", b"hi")])
    data = patch_header(data, 0, 0, b"d/\0")
    data = patch_header(data, 0, 156, b"\0")
    assert assert_fast_path_agrees_or_declines(data) == [("a-0.png", b"hi")]


@pytest.mark.parametrize("field_at", [100, 108, 136], ids=["mode", "uid", "mtime"])
def test_non_octal_unused_field_is_refused_like_tarfile(field_at):
    """A header whose checksum matches but whose mode, uid or mtime is not octal is refused by tarfile."""
    data, _ = make_tar([("a-0.png", b"hi")])
    data = patch_header(data, 0, field_at, b"zzzzzzz\0")
    assert_fast_path_agrees_or_declines(data)


# ---------------------------------------------------------------------------------------------
# .npy helpers


def npy_bytes(arr: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


def numpy_load(data: bytes) -> np.ndarray | None:
    """What numpy.load returns for the bytes, None where it raises."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # numpy raises ValueError, EOFError, OSError, OverflowError... for bad input
        return None


def assert_same_array(got: np.ndarray, expected: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert got.tolist() == expected.tolist()
    assert got.flags.writeable


def assert_load_npy_agrees_or_refuses(data: bytes) -> np.ndarray | None:
    """Where numpy.load raises, `_load_npy` raises DataError naming `WHERE`; where numpy reads an array,
    `_load_npy` returns the same one or (stricter) raises that DataError."""
    expected = numpy_load(data)
    try:
        got = _load_npy(data, WHERE)
    except DataError as e:
        assert str(e).startswith(WHERE + ": ")
        return None
    assert expected is not None, "numpy.load refuses these bytes"
    assert_same_array(got, expected)
    return got


UNPICKLED: list[str] = []


def record_unpickling(tag: str) -> None:
    UNPICKLED.append(tag)


class Tripwire:
    """Unpickling this calls `record_unpickling`: proof that an object array was (wrongly) unpickled."""

    def __reduce__(self):
        return (record_unpickling, ("unpickled",))


def sample_array(dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.names:
        arr = np.zeros(shape, dtype)
        for name in dtype.names:
            arr[name] = rng.integers(-100, 100, size=shape)
        return arr
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) > 0.5)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.asarray(rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype.newbyteorder("="))
                          ).astype(dtype)
    return np.asarray(rng.standard_normal(shape) * 1000).astype(dtype)


DTYPES = ["uint8", "float32", "float64", "int16", "bool", ">f4", ">i8", "<u4", "complex64", "S5",
          [("a", "<i4"), ("b", ">f8")]]
SHAPES = [(), (0,), (7,), (3, 4, 5), (2, 0, 3)]


# ---------------------------------------------------------------------------------------------
# .npy: well-formed files


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)], ids=["v1", "v2", "v3"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_load_npy_matches_numpy(dtype, shape, version):
    """Every dtype, shape and format version gives numpy.load's dtype, shape and values, writable."""
    arr = sample_array(dtype, shape)
    data = npy_bytes(arr, version)
    got = _load_npy(data, WHERE)
    assert_same_array(got, np.load(io.BytesIO(data), allow_pickle=False))
    assert_same_array(got, arr)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype", ["uint8", "float32", ">f4", "int16"])
def test_fortran_order_matches_numpy(dtype, version):
    """A Fortran-ordered file (its header says so) loads to the same values as numpy.load gives."""
    arr = np.asfortranarray(sample_array(dtype, (3, 4, 5), seed=1))
    data = npy_bytes(arr, version)
    found = _npy_header(data)
    assert found is not None and found[1][2] is True  # the case under test really is Fortran order
    assert_same_array(_load_npy(data, WHERE), np.load(io.BytesIO(data), allow_pickle=False))


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype", ["uint8", ">f4", [("a", "<i4"), ("b", ">f8")]], ids=str)
def test_npy_header_matches_numpys_header_reader(dtype, version):
    """`_npy_header` gives numpy's (dtype, shape, fortran) and the offset where the array data starts."""
    arr = sample_array(dtype, (3, 4))
    data = npy_bytes(arr, version)
    fp = io.BytesIO(data)
    assert np.lib.format.read_magic(fp) == version
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, parsed_dtype = read(fp)
    assert _npy_header(data) == (fp.tell(), (parsed_dtype, shape, fortran))
    assert fp.tell() == len(data) - arr.nbytes


def test_version_3_is_left_to_numpy():
    """Version 3 (UTF-8 header) is outside the fast header parser, which declines it."""
    data = npy_bytes(np.arange(3, dtype=np.float32), (3, 0))
    assert _npy_header(data) is None
    assert_same_array(_load_npy(data, WHERE), np.arange(3, dtype=np.float32))


def test_cached_header_does_not_reuse_data():
    """Two files sharing a header (the cache hit) still load their own values, into separate arrays."""
    a, b = np.arange(12, dtype=np.float32).reshape(3, 4), -np.arange(12, dtype=np.float32).reshape(3, 4)
    da, db = npy_bytes(a), npy_bytes(b)
    assert da[:_npy_header(da)[0]] == db[:_npy_header(db)[0]]
    got_a, got_b = _load_npy(da, WHERE), _load_npy(db, WHERE)
    got_a[0, 0] = 99.0
    assert_same_array(got_b, b)
    assert _load_npy(da, WHERE)[0, 0] == 0.0


# ---------------------------------------------------------------------------------------------
# .npy: damaged or hostile files


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_truncated_npy_at_every_offset(version):
    """Every truncation (magic, header length, header, data) is refused by numpy and by `_load_npy`
    with a DataError naming the sample."""
    data = npy_bytes(np.arange(12, dtype=np.float32).reshape(3, 4), version)
    for cut in range(len(data)):
        assert numpy_load(data[:cut]) is None, cut
        with pytest.raises(DataError, match=re.escape(WHERE)):
            _load_npy(data[:cut], WHERE)


@pytest.mark.parametrize("extra", [1, 4, 100])
def test_trailing_bytes_are_refused(extra):
    """Bytes after the array data are refused (stricter than numpy.load, which ignores them): a shard
    member holding more than its header describes is corrupt."""
    data = npy_bytes(np.arange(4, dtype=np.float32)) + b"\0" * extra
    assert numpy_load(data) is not None
    with pytest.raises(DataError, match=re.escape(WHERE) + r".*data bytes"):
        _load_npy(data, WHERE)


@pytest.mark.parametrize("magic", [b"\x93NUMPZ", b"\x92NUMPY", b"NUMPY\x93", b"\0" * 6])
def test_bad_magic_is_refused(magic):
    """Bytes without the .npy magic are refused by both (numpy would otherwise try to unpickle them)."""
    data = magic + npy_bytes(np.arange(4, dtype=np.uint8))[6:]
    assert numpy_load(data) is None
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(data, WHERE)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
@pytest.mark.parametrize("delta", [1, 64, 60000])
def test_header_length_past_the_end_is_refused(version, delta):
    """A header length field pointing past the end of the data is refused by both."""
    data = bytearray(npy_bytes(np.arange(4, dtype=np.uint8), version))
    width = 2 if version == (1, 0) else 4
    length = int.from_bytes(data[8:8 + width], "little")
    data[8:8 + width] = (length + len(data) + delta).to_bytes(width, "little")
    assert numpy_load(bytes(data)) is None
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(bytes(data), WHERE)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype", [object, [("a", "<i4"), ("b", object)]], ids=["object", "struct-with-object"])
def test_object_arrays_are_refused_and_never_unpickled(dtype, version):
    """An object array (a pickle after the header) is refused with DataError; nothing is unpickled."""
    arr = np.empty(2, dtype=dtype)
    if arr.dtype.names:
        arr["b"] = [Tripwire(), Tripwire()]
    else:
        arr[:] = [Tripwire(), Tripwire()]
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=True)
    data = buf.getvalue()
    UNPICKLED.clear()
    assert numpy_load(data) is None
    with pytest.raises(DataError, match=re.escape(WHERE) + r".*object arrays"):
        _load_npy(data, WHERE)
    assert UNPICKLED == []
    np.load(io.BytesIO(data), allow_pickle=True)  # the tripwire itself works
    assert UNPICKLED == ["unpickled", "unpickled"]


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_flipped_header_bits(version):
    """Every single-bit change in the header (the minor version byte and headers numpy's tokenizer gives
    up on included): `_load_npy` refuses with DataError where numpy refuses, and otherwise returns what
    numpy returns (or refuses, stricter)."""
    data = npy_bytes(np.arange(24, dtype="<f4").reshape(2, 3, 4), version)
    offset = _npy_header(data)[0]
    refused = 0
    for i in range(offset):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            refused += assert_load_npy_agrees_or_refuses(bytes(damaged)) is None
    assert refused > 4 * offset  # most changes break the file: the loop is not vacuous


@pytest.mark.parametrize("version", [(1, 0), (2, 0)], ids=["v1", "v2"])
def test_unbalanced_header_is_a_data_error(version):
    """A header that does not even tokenize (here 'shape': )2, 3, 4)) is a DataError naming the sample."""
    data = npy_bytes(np.arange(24, dtype="<f4").reshape(2, 3, 4), version)
    damaged = data.replace(b"'shape': (", b"'shape': )", 1)
    assert damaged != data
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(damaged, WHERE)


@pytest.mark.parametrize("minor", [1, 5, 255])
def test_unsupported_minor_version_is_refused(minor):
    """A `.npy` claiming version 1.x with x != 0 is refused, as numpy.load refuses it."""
    data = bytearray(npy_bytes(np.arange(3, dtype=np.float32)))
    data[7] = minor
    assert numpy_load(bytes(data)) is None
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(bytes(data), WHERE)


def raw_npy(header: str, payload: bytes = b"") -> bytes:
    """A version 1.0 `.npy` with the given header dict text (padded as numpy pads it)."""
    h = header.encode("latin1")
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + payload


def test_shape_with_negative_dimension_is_refused():
    """A negative dimension is refused by both."""
    data = raw_npy("{'descr': '|u1', 'fortran_order': False, 'shape': (-1,), }", b"x")
    assert numpy_load(data) is None
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(data, WHERE)


def test_shape_whose_product_wraps_around_is_refused():
    """Dimensions whose int64 product wraps to the payload size (4 * (2**62 + 1) = 4 mod 2**64) are refused."""
    data = raw_npy("{'descr': '|u1', 'fortran_order': False, 'shape': (4, " + str(2**62 + 1) + "), }", b"abcd")
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(data, WHERE)


def test_dimension_beyond_int64_is_a_data_error():
    """A dimension too large for int64 (a corrupt header) is a DataError naming the sample."""
    data = raw_npy("{'descr': '|u1', 'fortran_order': False, 'shape': (" + str(2**70) + ",), }", b"x")
    assert numpy_load(data) is None
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(data, WHERE)


def test_npz_archive_in_a_npy_member_is_refused():
    """A `.npz` (zip) stored under a `.npy` name is not an array: DataError naming the sample."""
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(3))
    with pytest.raises(DataError, match=re.escape(WHERE)):
        _load_npy(buf.getvalue(), WHERE)
