"""The tar format: the deterministic header encoder, checked against Python's and GNU
tar's readers, and the strict reader, whose read-ahead lets the headers of small
members share one positioned read."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from guix_image.errors import ArchiveError
from guix_image.formats.streams import SliceReader
from guix_image.tar.format import BLOCK, DIRTYPE, END_OF_ARCHIVE, REGTYPE, SYMTYPE, padding
from guix_image.tar.reader import TarReader, parse_number
from guix_image.tar.writer import HeaderEncoder, split_ustar_name

from .support.tools import have

# -- the writer: what it encodes, read back by others ------------------------------


def encode_archive(
    encoder: HeaderEncoder, members: list[tuple[bytes, bytes, int, bytes, bytes]]
) -> bytes:
    out = io.BytesIO()
    for name, typeflag, mode, content, linkname in members:
        out.write(encoder.encode(name, typeflag, mode, len(content), linkname))
        out.write(content + bytes(padding(len(content))))
    out.write(END_OF_ARCHIVE)
    return out.getvalue()


def read_with_tarfile(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        return tar.getmembers()


NAMES = [
    b"gnu/store/short",
    b"gnu/store/" + b"x" * 120 + b"/file",  # needs the ustar prefix field
    b"gnu/store/" + b"y" * 300,  # over 255 bytes: needs PAX
    b"d" * 99 + b"/",  # a directory name just at the limit
    "gnu/store/caf\u00e9-\u65e5\u672c".encode(),  # UTF-8
    b"gnu/store/bad-\xff\xfe",  # not UTF-8, fits ustar
    b"gnu/store/" + b"\xff" * 200,  # not UTF-8 and too long: PAX with hdrcharset
]


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_through_python_tarfile(name: bytes) -> None:
    encoder = HeaderEncoder(mtime=1)
    typeflag = DIRTYPE if name.endswith(b"/") else REGTYPE
    content = b"" if typeflag == DIRTYPE else b"data"
    [member] = read_with_tarfile(encode_archive(encoder, [(name, typeflag, 0o555, content, b"")]))
    assert member.name.encode("utf-8", "surrogateescape") == name.rstrip(b"/")
    assert member.size == len(content)


def test_headers_are_whole_blocks() -> None:
    encoder = HeaderEncoder(mtime=1)
    for name in NAMES:
        for linkname in (b"", b"t" * 50, b"t" * 150):
            assert len(encoder.encode(name, SYMTYPE, 0o777, 0, linkname)) % BLOCK == 0


def test_every_field_is_what_was_asked_for() -> None:
    encoder = HeaderEncoder(mtime=1700000000, uid=1000, gid=100, uname="builder", gname="users")
    data = encode_archive(
        encoder,
        [
            (b"a/", DIRTYPE, 0o755, b"", b""),
            (b"a/f", REGTYPE, 0o4755, b"hello", b""),
            (b"a/l", SYMTYPE, 0o777, b"", b"../" + b"z" * 200),
        ],
    )
    dir_, file_, link = read_with_tarfile(data)
    assert (dir_.type, dir_.mode) == (tarfile.DIRTYPE, 0o755)
    assert (file_.mode, file_.size, file_.mtime) == (0o4755, 5, 1700000000)
    assert (file_.uid, file_.gid, file_.uname, file_.gname) == (1000, 100, "builder", "users")
    assert link.linkname == "../" + "z" * 200
    assert isinstance(file_.mtime, int)
    for member in (dir_, file_, link):
        assert "mtime" not in member.pax_headers
        assert "atime" not in member.pax_headers
        assert "ctime" not in member.pax_headers


def test_large_owner_ids_and_names_use_pax() -> None:
    encoder = HeaderEncoder(mtime=1, uid=3_000_000, gid=4_000_000, uname="u" * 40, gname="g" * 40)
    [member] = read_with_tarfile(encode_archive(encoder, [(b"f", REGTYPE, 0o644, b"x", b"")]))
    assert (member.uid, member.gid) == (3_000_000, 4_000_000)
    assert (member.uname, member.gname) == ("u" * 40, "g" * 40)


def test_sizes_of_8_gib_and_more_use_a_pax_size_record() -> None:
    encoder = HeaderEncoder(mtime=1)
    size = 8 << 30
    header = encoder.encode(b"big", REGTYPE, 0o644, size)
    assert len(header) == 3 * BLOCK  # PAX header, its records, the member header
    assert b" size=%d\n" % size in header


def test_ustar_split_respects_field_sizes() -> None:
    assert split_ustar_name(b"a" * 100) == (b"", b"a" * 100)
    assert split_ustar_name(b"p" * 155 + b"/" + b"n" * 100) == (b"p" * 155, b"n" * 100)
    assert split_ustar_name(b"p" * 156 + b"/" + b"n") is None
    assert split_ustar_name(b"p/" + b"n" * 101) is None
    assert split_ustar_name(b"d" * 120 + b"/") is None  # a trailing slash cannot split


def test_mtime_must_fit_the_header() -> None:
    with pytest.raises(ValueError):
        HeaderEncoder(mtime=-1)
    with pytest.raises(ValueError):
        HeaderEncoder(mtime=8**11)


@pytest.mark.skipif(not have("tar"), reason="GNU tar is not installed")
def test_gnu_tar_reads_what_we_write(tmp_path: Path) -> None:
    encoder = HeaderEncoder(mtime=1)
    members = [
        (b"top/", DIRTYPE, 0o755, b"", b""),
        (b"top/" + b"n" * 150, REGTYPE, 0o644, b"long", b""),
        (b"top/" + b"m" * 300, REGTYPE, 0o644, b"longer", b""),
        (b"top/link", SYMTYPE, 0o777, b"", b"t" * 150),
    ]
    path = tmp_path / "x.tar"
    path.write_bytes(encode_archive(encoder, members))
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, check=True, text=True)
    assert listing.stdout.splitlines() == [
        "top/",
        "top/" + "n" * 150,
        "top/" + "m" * 300,
        "top/link",
    ]


# -- the reader: its read-ahead window, and numeric fields ---------------------------


def write_archive(path: Path) -> list[tuple[str, bytes]]:
    """Members of many sizes, some with PAX headers (long names), in Python's tarfile."""
    rng = random.Random(7)
    members = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(300):
            name = f"dir/{i:03d}" + ("-" + "n" * rng.randrange(80, 300) if i % 7 == 0 else "")
            data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randrange(3000)]))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            members.append((name, data))
    return members


def read_back(path: Path, *, contents: bool, window: int) -> list[tuple[str, bytes]]:
    """Names, and contents read in turns with `read` and `readinto`."""
    found = []
    with path.open("rb") as file:
        reader = TarReader(
            SliceReader(file, 0, path.stat().st_size),  # type: ignore[arg-type]
            name="t",
            window=window,
        )
        for number, member in enumerate(reader):
            data = b""
            if contents and number % 2:
                buffer = bytearray(member.size)
                got = reader.readinto(memoryview(buffer)) if member.size else 0
                data = bytes(buffer[:got])
            elif contents:
                data = reader.read()
            found.append((member.name, data))
    return found


# 0: a read per header; 1100 and 1536: windows that end inside headers.
@pytest.mark.parametrize("window", [0, 1100, 1536, 4096, 32 << 10])
@pytest.mark.parametrize("contents", [True, False], ids=["read", "skipped"])
def test_any_window_reads_the_same_members(tmp_path: Path, window: int, contents: bool) -> None:
    expected = write_archive(tmp_path / "a.tar")
    found = read_back(tmp_path / "a.tar", contents=contents, window=window)
    assert [name for name, _ in found] == [name for name, _ in expected]
    if contents:
        assert found == expected


@pytest.mark.parametrize("window", [1100, 32 << 10])
def test_a_header_cut_short_is_truncation_whatever_the_window(tmp_path: Path, window: int) -> None:
    archive = tmp_path / "a.tar"
    write_archive(archive)
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    archive.write_bytes(data[: last.offset + 300])  # inside the last member's header
    with pytest.raises(ArchiveError, match="the stream ends inside header"):
        read_back(archive, contents=False, window=window)


def _field_error(message: str) -> ArchiveError:
    return ArchiveError(message)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"0000644\0", 0o644),  # as GNU tar and Python write it
        (b"644 \0\0\0\0", 0o644),
        (b"0012345 ", 0o12345),
        (b"015353\0 ", 0o15353),  # a checksum field
        (b" 644\0\0\0\0", 0o644),  # leading spaces: old writers
        (b"644\0 999", 0o644),  # after the first NUL, nothing counts
        (b"\0" * 8, 0),
        (b" " * 8, 0),
        (b"\x80\0\0\0\0\0\0\x2a", 42),  # GNU base-256
    ],
)
def test_numeric_fields_parse_as_every_reader_does(field: bytes, value: int) -> None:
    assert parse_number(field, "mode", _field_error) == value


@pytest.mark.parametrize(
    "field",
    [
        b"0009\0\0\0\0",
        b"6 4\0\0\0\0",
        b"-1\0\0\0\0\0\0",
        b"0o17\0\0\0\0",
        b"1_0\0\0\0\0\0",
        b"+7\0\0\0\0\0\0",
        b"12345678",
    ],
)
def test_numeric_fields_other_readers_would_read_differently_are_refused(field: bytes) -> None:
    with pytest.raises(ArchiveError, match="bad mode field"):
        parse_number(field, "mode", _field_error)
