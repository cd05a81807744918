"""A strict, bounded tar reader for archives that come from anywhere.

It reads headers and hands out member contents as byte ranges of the
underlying stream; it never extracts anything and never treats a member name
as a path to open. It understands what real image tools write (POSIX ustar,
PAX extended headers, GNU long names, base-256 numbers) and refuses, with an
`ArchiveError` that says where, what could make two readers disagree:
bad checksums, negative or malformed sizes, oversized or malformed PAX
records, and members cut short by the end of the stream.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..errors import ArchiveError
from .format import (
    BLKTYPE,
    BLOCK,
    CHRTYPE,
    CONTTYPE,
    DIRTYPE,
    FIFOTYPE,
    GNU_LONGLINK,
    GNU_LONGNAME,
    LNKTYPE,
    PAX_GLOBAL,
    PAX_HEADER,
    REGTYPE,
    SYMTYPE,
    byte_sum,
    padded,
)

MAX_PAX_SIZE = 1 << 20  # largest PAX header or GNU long name we read
HEADER_ONLY_TYPES = frozenset({LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE})
TYPE_NAMES = {
    REGTYPE: "file",
    LNKTYPE: "hardlink",
    SYMTYPE: "symlink",
    CHRTYPE: "char-device",
    BLKTYPE: "block-device",
    DIRTYPE: "dir",
    FIFOTYPE: "fifo",
}


_NO_PAX: dict[str, str] = {}  # shared, never modified
_ZERO_BLOCK = bytes(BLOCK)


class TarMember:
    """One member: name, type and size read eagerly, the other fields when asked for."""

    __slots__ = (
        "_block",
        "_link",
        "_where",
        "header_offset",
        "name",
        "offset",
        "pax",
        "size",
        "type",
    )

    def __init__(
        self,
        name: str,
        typeflag: bytes,
        size: int,
        offset: int,
        header_offset: int,
        pax: dict[str, str],
        block: bytes,
        link: bytes | None,
        where: str,
    ) -> None:
        self.name = name  # as stored (PAX path, GNU long name or prefix/name), decoded losslessly
        self.type = typeflag  # '\0' and '7' are reported as '0' (regular file)
        self.size = size  # bytes of content that follow the header (0 for header-only types)
        self.offset = offset  # where the content starts in the stream
        self.header_offset = header_offset
        self.pax = pax
        self._block, self._link, self._where = block, link, where

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type.decode('latin-1')!r}")

    def isreg(self) -> bool:
        return self.type == REGTYPE

    @property
    def mode(self) -> int:
        return self._number(100, 108, "mode") & 0o7777

    @property
    def uid(self) -> int:
        return self._pax_number("uid") if "uid" in self.pax else self._number(108, 116, "uid")

    @property
    def gid(self) -> int:
        return self._pax_number("gid") if "gid" in self.pax else self._number(116, 124, "gid")

    @property
    def mtime(self) -> float:
        if "mtime" in self.pax:
            try:
                value = float(self.pax["mtime"])
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise self._error(f"PAX mtime {self.pax['mtime']!r} is not a number")
            return value
        return self._number(136, 148, "mtime")

    @property
    def uname(self) -> str:
        return self.pax.get("uname") or decode_name(_cstring(self._block[265:297]))

    @property
    def gname(self) -> str:
        return self.pax.get("gname") or decode_name(_cstring(self._block[297:329]))

    @property
    def linkname(self) -> str:
        if "linkpath" in self.pax:
            return self.pax["linkpath"]
        return decode_name(self._link if self._link is not None else _cstring(self._block[157:257]))

    def _number(self, start: int, end: int, what: str) -> int:
        return parse_number(self._block[start:end], what, self._error)

    def _pax_number(self, key: str) -> int:
        return pax_number(self.pax, key, self._error)

    def _error(self, message: str) -> ArchiveError:
        return ArchiveError(f"{self._where}: at byte {self.header_offset}: {message}")


def parse_number(field_bytes: bytes, what: str, error: Callable[[str], ArchiveError]) -> int:
    """A numeric header field: octal digits, or GNU base-256 (never negative)."""
    if field_bytes[0] & 0x80:  # base-256: big-endian two's complement, 0x40 the sign
        if field_bytes[0] & 0x40:
            raise error(f"negative {what} in header")
        return int.from_bytes(field_bytes, "big") & ~(0x80 << (8 * (len(field_bytes) - 1)))
    value = _octal(field_bytes)
    if value is None:  # int() alone would also take "-1", "+7", "0o7", "1_0"
        text = field_bytes.split(b"\0", 1)[0].strip(b" ")
        raise error(f"bad {what} field {text!r} in header")
    return value


def _octal(field_bytes: bytes) -> int | None:
    """An octal text field, or None if it holds anything but octal digits."""
    digits = field_bytes.rstrip(b"\0 ")
    if digits.isdigit():  # what every writer stores: digits, then NULs or spaces
        try:
            return int(digits, 8)
        except ValueError:  # an 8 or a 9
            return None
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if field_bytes[0] & 0x80 or text.translate(None, b"01234567"):
        return None
    return int(text or b"0", 8)


def pax_number(pax: dict[str, str], key: str, error: Callable[[str], ArchiveError]) -> int:
    """A numeric PAX record: ASCII digits only (str.isdigit alone takes "²")."""
    value = pax[key]
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise error(f"PAX {key} {value!r} is not a non-negative integer")
    return int(value)


def decode_name(raw: bytes) -> str:
    """Bytes to str without losing anything (undecodable bytes become surrogates)."""
    return raw.decode("utf-8", "surrogateescape")


def normalise_member_name(name: str) -> str:
    """The path a loader would use for `name`: no leading '/' or './', no '//'."""
    plain = name.rstrip("/")
    if plain and plain[0] not in "./" and "//" not in plain and "/." not in plain:
        return plain  # already normal: the common case, kept fast
    normal = posixpath.normpath("/" + name).lstrip("/")
    return "" if normal == "." else normal


def is_climbing(name: str) -> bool:
    """True if `name` leaves the archive root when joined component by component."""
    if ".." not in name:
        return False
    depth = 0
    for part in name.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


# Bytes read ahead by a positioned read of a header (or of other small
# reads: extended headers, short contents).
WINDOW = 32 << 10


class TarReader:
    """Iterates the members of a tar stream.

    Contents are read with `read` / `iter_content` while the member is
    current; the iterator skips what was not read (seeking when it can).
    """

    def __init__(self, stream: BinaryIO, *, name: str = "archive", window: int = WINDOW) -> None:
        self._stream = stream
        self._window_size = window  # 0: a read per header
        self.name = name
        self._position = 0
        self._content_end = 0  # end of the current member's padded content
        self._remaining = 0  # unread content bytes of the current member
        self._skip_buffer: memoryview | None = None
        self._end: int | None = None  # stream length, when it can seek
        try:
            if stream.seekable():
                self._end = stream.seek(0, io.SEEK_END)
                stream.seek(0)
        except (AttributeError, ValueError, OSError):
            self._end = None
        # Positioned reads, when the stream offers them: no seeking at all.
        self._pread: Callable[[int, int], bytes] | None = (
            getattr(stream, "pread", None) if self._end is not None else None
        )
        self._window = b""  # bytes from _window_start, read ahead by a positioned read
        self._window_start = 0

    @property
    def seekable(self) -> bool:
        return self._end is not None

    def __iter__(self) -> Iterator[TarMember]:
        while True:
            member = self._next()
            if member is None:
                return
            yield member

    # -- contents ---------------------------------------------------------

    def read(self, limit: int | None = None) -> bytes:
        """The rest of the current member's content, at most `limit` bytes."""
        want = max(0, self._remaining if limit is None else min(limit, self._remaining))
        data = self._read_exact(want, "member content")
        self._remaining -= len(data)
        return data

    def iter_content(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        while self._remaining > 0:
            yield self.read(chunk_size)

    def readinto(self, buffer: memoryview) -> int:
        """Read up to len(buffer) content bytes into buffer; 0 at the member's end."""
        want = min(len(buffer), self._remaining)
        got = 0
        if self._pread is not None:
            data = self._pread(want, self._position)
            if len(data) < want:
                raise self._truncated("member content")
            buffer[:want] = data
            got = want
        while got < want:
            n = self._stream.readinto(buffer[got:want])  # type: ignore[attr-defined]
            if not n:
                raise self._truncated("member content")
            got += n
        self._position += got
        self._remaining -= got
        return got

    # -- headers ----------------------------------------------------------

    def _next(self) -> TarMember | None:
        if self._content_end > self._position:
            self._skip_to(self._content_end)
        pax: dict[str, str] = _NO_PAX
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            header_offset = self._position
            block = self._read_block()
            if block is None:
                return None
            typeflag, size = self._parse_common(block, header_offset)
            if typeflag in (PAX_HEADER, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                if size > MAX_PAX_SIZE:
                    raise self._error(
                        header_offset, f"extended header of {size} bytes is too large"
                    )
                payload = self._read_exact(size, "extended header")
                self._skip_exact(padded(size) - size)
                if typeflag == PAX_HEADER:
                    pax = {**pax, **self._parse_pax(payload, header_offset)}
                elif typeflag == GNU_LONGNAME:
                    long_name = payload.rstrip(b"\0")
                elif typeflag == GNU_LONGLINK:
                    long_link = payload.rstrip(b"\0")
                # Global PAX headers are not applied: readers disagree on them.
                continue
            if pax:
                size = self._apply_pax_size(pax, size, header_offset)
            return self._member(block, header_offset, typeflag, size, pax, long_name, long_link)

    def _member(
        self,
        block: bytes,
        header_offset: int,
        typeflag: bytes,
        size: int,
        pax: dict[str, str],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarMember:
        if typeflag in (b"\0", CONTTYPE):
            typeflag = REGTYPE
        name = _cstring(block[0:100])
        if block[257:263] == b"ustar\0" and block[345]:  # POSIX ustar: a prefix
            name = _cstring(block[345:500]) + b"/" + name
        if long_name is not None:
            name = long_name
        if typeflag in HEADER_ONLY_TYPES:
            size = 0
        member = TarMember(
            pax["path"] if "path" in pax else name.decode("utf-8", "surrogateescape"),
            typeflag,
            size,
            self._position,
            header_offset,
            pax,
            block,
            long_link,
            self.name,
        )
        if not member.name:
            raise self._error(header_offset, "member has an empty name")
        self._remaining = size
        self._content_end = self._position + padded(size)
        return member

    def _parse_common(self, block: bytes, offset: int) -> tuple[bytes, int]:
        stored = _octal(block[148:156])  # parsed inline: this runs for every entry
        size = _octal(block[124:136])
        if stored is None:
            stored = self._number(block[148:156], offset, "checksum")
        if size is None:
            size = self._number(block[124:136], offset, "size")
        unsigned = byte_sum(block[:148] + b"        " + block[156:])  # the field as spaces
        if stored != unsigned:
            signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 32
            if stored != signed:
                raise self._error(offset, "bad header checksum (not a tar archive, or corrupt)")
        return block[156:157], size

    def _apply_pax_size(self, pax: dict[str, str], size: int, offset: int) -> int:
        if "size" not in pax:
            return size
        pax_size = pax_number(pax, "size", lambda message: self._error(offset, message))
        if size not in (0, pax_size):
            raise self._error(offset, f"PAX size {pax_size} disagrees with header size {size}")
        return pax_size

    def _parse_pax(self, payload: bytes, offset: int) -> dict[str, str]:
        # Values are decoded losslessly whatever hdrcharset says.
        records: dict[str, str] = {}
        position = 0
        while position < len(payload):
            if payload[position] == 0:  # some writers pad the payload with NULs
                if payload[position:].strip(b"\0"):
                    raise self._error(offset, "malformed PAX header (data after padding)")
                break
            space = payload.find(b" ", position, position + 20)
            digits = payload[position:space] if space > 0 else b""
            if not digits.isdigit():
                raise self._error(offset, "malformed PAX header (bad record length)")
            length = int(digits)
            end = position + length
            if length <= len(digits) + 1 or end > len(payload) or payload[end - 1 : end] != b"\n":
                raise self._error(offset, "malformed PAX header (record length does not fit)")
            key, equals, value = payload[space + 1 : end - 1].partition(b"=")
            if not equals or not key:
                raise self._error(offset, "malformed PAX header (record without key=value)")
            text = key.decode("utf-8", "surrogateescape")
            records[text] = value.decode("utf-8", "surrogateescape")
            position = end
        return records

    def _number(self, field_bytes: bytes, offset: int, what: str) -> int:
        return parse_number(field_bytes, what, lambda message: self._error(offset, message))

    # -- low-level reading ------------------------------------------------

    def _read_fully(self, size: int) -> bytes:
        """Up to `size` bytes from the current position: fewer only at the end."""
        if self._pread is not None:
            return self._read_through_window(self._pread, size)
        data = self._stream.read(size)
        while 0 < len(data) < size:
            more = self._stream.read(size - len(data))
            if not more:
                break
            data += more
        return data

    def _read_through_window(self, pread: Callable[[int, int], bytes], size: int) -> bytes:
        """A positioned read that reads ahead: small members' headers share one system call.

        What is read ahead and not used costs a copy of at most a window's bytes
        per header: nothing next to the contents that precede the header.
        """
        offset = self._position - self._window_start
        window = self._window
        if offset >= 0 and offset + size <= len(window):
            return window[offset : offset + size]
        if size > self._window_size // 2:
            return pread(size, self._position)
        self._window = window = pread(self._window_size, self._position)
        self._window_start = self._position
        return window[:size]

    def _read_block(self) -> bytes | None:
        """The next header block, or None at the end of the archive."""
        position = self._position
        offset = position - self._window_start
        if 0 <= offset <= len(self._window) - BLOCK:  # read ahead already: the common case
            block = self._window[offset : offset + BLOCK]
        else:
            block = self._read_fully(BLOCK)
            if not block:
                return None  # EOF at a block boundary: tolerated, as every tool does
            if len(block) < BLOCK:
                raise self._truncated("header")
        self._position = position + BLOCK
        if block == _ZERO_BLOCK:  # the end-of-archive marker
            return None
        return block

    def _read_exact(self, size: int, what: str) -> bytes:
        data = self._read_fully(size) if size else b""
        if len(data) < size:
            raise self._truncated(what)
        self._position += size
        return data

    def _skip_exact(self, size: int) -> None:
        self._skip_to(self._position + size)

    def _skip_to(self, target: int) -> None:
        distance = target - self._position
        if distance <= 0:
            return
        if self._end is not None:
            if self._end < target:
                self._position = self._end
                raise self._truncated("member content")
            if self._pread is None:
                self._stream.seek(target)
            self._position = target
        else:
            if self._skip_buffer is None:
                self._skip_buffer = memoryview(bytearray(1 << 20))
            buffer = self._skip_buffer
            while distance:
                got = self._stream.readinto(buffer[: min(distance, len(buffer))])  # type: ignore[attr-defined]
                if not got:
                    raise self._truncated("member content")
                distance -= got
                self._position += got
        self._remaining = 0

    def _truncated(self, what: str) -> ArchiveError:
        return self._error(self._position, f"truncated archive: the stream ends inside {what}")

    def _error(self, offset: int, message: str) -> ArchiveError:
        error = ArchiveError(f"{self.name}: at byte {offset}: {message}")
        error.offset = offset
        return error


def _cstring(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]
