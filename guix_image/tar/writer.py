"""Deterministic tar headers.

We write tar headers ourselves instead of using `tarfile` because we need
three things it does not give: the exact size of an archive computed from
metadata alone (so a layer can be streamed in one pass), full control over
every byte (no float mtimes, no atime/ctime, no user-dependent fields), and
speed on stores with tens of thousands of small files.

Format: POSIX ustar, with a PAX extended header only for what ustar cannot
hold (long names and link targets, sizes of 8 GiB and more, large ids, long
owner names). Names that are not UTF-8 stay raw bytes in the ustar fields and
are marked `hdrcharset=BINARY` when they must go into a PAX record.
"""

from __future__ import annotations

from .format import PAX_HEADER, byte_sum, padding

_MAX_OCTAL_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1
_MAX_OCTAL_ID = 0o7777777  # 7 octal digits
_PAX_NAME = b"././@PaxHeader"
_NUL = b"\0"


def split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    """Split `name` into ustar (prefix, name) fields, or None if it cannot fit."""
    if len(name) <= 100:
        return b"", name
    # The prefix (at most 155 bytes) ends just before a '/'; the rest (1 to 100
    # bytes) goes into the name field. A directory's trailing '/' cannot split.
    slash = name.rfind(b"/", 0, min(156, len(name) - 1))
    if slash <= 0 or len(name) - slash - 1 > 100:
        return None
    return name[:slash], name[slash + 1 :]


def _pax_record(key: bytes, value: bytes) -> bytes:
    # The length prefix counts itself, so find the fixed point.
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length = len(str(length).encode()) + len(body)
    return str(length).encode() + body


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


class HeaderEncoder:
    """Encodes tar headers that share one owner and one mtime.

    Every field that is the same for all entries of an archive is encoded
    once here; `encode` only formats the varying ones.
    """

    def __init__(
        self, *, mtime: int, uid: int = 0, gid: int = 0, uname: str = "root", gname: str = "root"
    ) -> None:
        if not 0 <= mtime <= _MAX_OCTAL_SIZE:
            raise ValueError(f"mtime {mtime} is outside what a tar header can hold")
        self.mtime = mtime
        self.owner = (uid, gid, uname, gname)
        uname_b, gname_b = uname.encode("utf-8"), gname.encode("utf-8")
        self._owner_pax: list[tuple[bytes, bytes]] = []
        if uid > _MAX_OCTAL_ID:
            self._owner_pax.append((b"uid", b"%d" % uid))
            uid = 0
        if gid > _MAX_OCTAL_ID:
            self._owner_pax.append((b"gid", b"%d" % gid))
            gid = 0
        if len(uname_b) > 32:
            self._owner_pax.append((b"uname", uname_b))
            uname_b = b""
        if len(gname_b) > 32:
            self._owner_pax.append((b"gname", gname_b))
            gname_b = b""
        self._ids = _octal(uid, 8) + _octal(gid, 8)
        # The checksum field counts as spaces while the checksum is computed.
        self._mtime_checksum = _octal(mtime, 12) + b" " * 8
        self._magic_owner_devices = (
            b"ustar\x0000"
            + uname_b.ljust(32, _NUL)
            + gname_b.ljust(32, _NUL)
            + _octal(0, 8)
            + _octal(0, 8)
        )

    def encode(
        self, name: bytes, typeflag: bytes, mode: int, size: int = 0, linkname: bytes = b""
    ) -> bytes:
        """Header block(s) for one member: a PAX header first if ustar is not enough."""
        simple = len(linkname) <= 100 and size <= _MAX_OCTAL_SIZE and not self._owner_pax
        if simple and len(name) <= 100:  # the common case, kept fast
            return self._ustar(name, b"", typeflag, mode, size, linkname)
        fields = split_ustar_name(name)
        if simple and fields is not None:
            return self._ustar(fields[1], fields[0], typeflag, mode, size, linkname)
        records: list[tuple[bytes, bytes]] = []
        if fields is None:
            records.append((b"path", name))
            fields = (b"", name[:100])
        if len(linkname) > 100:
            records.append((b"linkpath", linkname))
            linkname = linkname[:100]
        if size > _MAX_OCTAL_SIZE:
            records.append((b"size", b"%d" % size))
        records.extend(self._owner_pax)
        if not all(_is_utf8(value) for key, value in records if key in (b"path", b"linkpath")):
            records.insert(0, (b"hdrcharset", b"BINARY"))
        payload = b"".join(_pax_record(k, v) for k, v in records)
        pax = self._ustar(_PAX_NAME, b"", PAX_HEADER, 0o644, len(payload), b"")
        ustar_size = size if size <= _MAX_OCTAL_SIZE else 0
        main = self._ustar(fields[1], fields[0], typeflag, mode, ustar_size, linkname)
        return pax + payload + bytes(padding(len(payload))) + main

    def _ustar(
        self, name: bytes, prefix: bytes, typeflag: bytes, mode: int, size: int, linkname: bytes
    ) -> bytes:
        header = b"".join(
            (
                name.ljust(100, _NUL),
                b"%07o\0" % mode,
                self._ids,
                b"%011o\0" % size,
                self._mtime_checksum,
                typeflag,
                linkname.ljust(100, _NUL),
                self._magic_owner_devices,
                prefix.ljust(167, _NUL),  # prefix (155 bytes) and the unused tail (12)
            )
        )
        return header[:148] + b"%06o\0 " % byte_sum(header) + header[156:]
