"""The deterministic tar header encoder, checked against Python's and GNU tar's readers."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

from guix_image.tarwriter import (
    BLOCK,
    DIRTYPE,
    END_OF_ARCHIVE,
    REGTYPE,
    SYMTYPE,
    HeaderEncoder,
    padding,
    split_ustar_name,
)

from .conftest import have


def archive(encoder: HeaderEncoder, members: list[tuple[bytes, bytes, int, bytes, bytes]]) -> bytes:
    out = io.BytesIO()
    for name, typeflag, mode, content, linkname in members:
        out.write(encoder.encode(name, typeflag, mode, len(content), linkname))
        out.write(content + bytes(padding(len(content))))
    out.write(END_OF_ARCHIVE)
    return out.getvalue()


def read_back(data: bytes) -> list[tarfile.TarInfo]:
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
    [member] = read_back(archive(encoder, [(name, typeflag, 0o555, content, b"")]))
    assert member.name.encode("utf-8", "surrogateescape") == name.rstrip(b"/")
    assert member.size == len(content)


def test_headers_are_whole_blocks() -> None:
    encoder = HeaderEncoder(mtime=1)
    for name in NAMES:
        for linkname in (b"", b"t" * 50, b"t" * 150):
            assert len(encoder.encode(name, SYMTYPE, 0o777, 0, linkname)) % BLOCK == 0


def test_every_field_is_what_was_asked_for() -> None:
    encoder = HeaderEncoder(mtime=1700000000, uid=1000, gid=100, uname="builder", gname="users")
    data = archive(
        encoder,
        [
            (b"a/", DIRTYPE, 0o755, b"", b""),
            (b"a/f", REGTYPE, 0o4755, b"hello", b""),
            (b"a/l", SYMTYPE, 0o777, b"", b"../" + b"z" * 200),
        ],
    )
    dir_, file_, link = read_back(data)
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
    [member] = read_back(archive(encoder, [(b"f", REGTYPE, 0o644, b"x", b"")]))
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
def test_gnu_tar_reads_what_we_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    encoder = HeaderEncoder(mtime=1)
    members = [
        (b"top/", DIRTYPE, 0o755, b"", b""),
        (b"top/" + b"n" * 150, REGTYPE, 0o644, b"long", b""),
        (b"top/" + b"m" * 300, REGTYPE, 0o644, b"longer", b""),
        (b"top/link", SYMTYPE, 0o777, b"", b"t" * 150),
    ]
    path = tmp_path / "x.tar"
    path.write_bytes(archive(encoder, members))
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, check=True, text=True)
    assert listing.stdout.splitlines() == [
        "top/",
        "top/" + "n" * 150,
        "top/" + "m" * 300,
        "top/link",
    ]
