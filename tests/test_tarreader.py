"""The tar reader's read-ahead: headers of small members share one positioned read."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from guix_image import tarreader
from guix_image.streams import SliceReader
from guix_image.tarreader import ArchiveError, TarReader


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


def read_back(path: Path, *, contents: bool) -> list[tuple[str, bytes]]:
    """Names, and contents read in turns with `read` and `readinto`."""
    found = []
    with path.open("rb") as file:
        reader = TarReader(SliceReader(file, 0, path.stat().st_size), name="t")  # type: ignore[arg-type]
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
def test_any_window_reads_the_same_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int, contents: bool
) -> None:
    monkeypatch.setattr(tarreader, "WINDOW", window)  # 0: a read per header, as without
    expected = write_archive(tmp_path / "a.tar")
    found = read_back(tmp_path / "a.tar", contents=contents)
    assert [name for name, _ in found] == [name for name, _ in expected]
    if contents:
        assert found == expected


@pytest.mark.parametrize("window", [1100, 32 << 10])
def test_a_header_cut_short_is_truncation_whatever_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    monkeypatch.setattr(tarreader, "WINDOW", window)
    archive = tmp_path / "a.tar"
    write_archive(archive)
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    archive.write_bytes(data[: last.offset + 300])  # inside the last member's header
    with pytest.raises(ArchiveError, match="the stream ends inside header"):
        read_back(archive, contents=False)


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
    assert tarreader.parse_number(field, "mode", _field_error) == value


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
        tarreader.parse_number(field, "mode", _field_error)
