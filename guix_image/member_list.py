"""Member lists: what a rebuild of a cached layer streams instead of walking the store.

A layer tar is its members' headers, each followed by a file's contents.
After a build, the cache keeps each layer's encoded headers and, per member,
its name, content size, mode and identity on disk (inode and ctime). Rebuilding
the layer then opens each file by name instead of listing every directory,
stat-ing every entry and encoding every header again: on a store of 35,000
files that walk is about a quarter of a build's CPU time.

A list is a prediction, like the digest next to it: see StoreLayer for how
it is checked. The file is a sequence of chunks, so that reading or writing
one holds a bounded amount in memory whatever the layer's size:

    header:  MAGIC, then u64 member count and u64 file length
    chunk:   u32 count, u32 names length, u32 headers length, then
             count x u64 content size, u64 inode, i64 ctime (ns),
             count x u32 mode, u32 end of the member's header in the chunk's headers,
             the names joined by NUL, the headers
    end:     a chunk of count 0

Integers are little-endian; a list written elsewhere is only ever unusable.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections.abc import Iterator
from itertools import accumulate
from typing import BinaryIO, NamedTuple

MAGIC = b"guix-image member list 1\n"
_FILE_HEADER = struct.Struct("<QQ")
_CHUNK_HEADER = struct.Struct("<III")
CHUNK_MEMBERS = 4096  # about 2.5 MiB of headers and names per chunk
_MAX_CHUNK_BYTES = 64 << 20
_USABLE = sys.byteorder == "little"  # the arrays are read in native order


class MemberListError(Exception):
    """A member list that cannot be read as one: it is ignored or the build fails."""


class Chunk(NamedTuple):
    """Up to CHUNK_MEMBERS consecutive members of a layer."""

    names: list[bytes]
    sizes: memoryview  # content bytes; 0 for directories, symlinks and empty files
    modes: memoryview  # permission bits
    inodes: memoryview  # 0 for directories that are not on disk (store_dir's ancestors)
    ctimes: memoryview
    ends: memoryview  # member i's header is headers[ends[i - 1]:ends[i]]
    headers: memoryview


class MemberListWriter:
    """Records a layer's members, in order, into `file` (open for writing, at offset 0)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._file.write(MAGIC + _FILE_HEADER.pack(0, 0))  # rewritten by finish()
        self._count = 0
        self.finished = False
        self._names: list[bytes] = []
        self._sizes: list[int] = []
        self._modes: list[int] = []
        self._inodes: list[int] = []
        self._ctimes: list[int] = []
        self._headers: list[bytes] = []

    def add(self, header: bytes, size: int, name: bytes, mode: int, inode: int, ctime: int) -> None:
        self._headers.append(header)
        self._sizes.append(size)
        self._names.append(name)
        self._modes.append(mode)
        self._inodes.append(inode)
        self._ctimes.append(ctime)
        if len(self._names) == CHUNK_MEMBERS:
            self._write_chunk()

    def finish(self) -> None:
        """Write the last chunk, the end, and the header; the file is then complete."""
        self._write_chunk()
        self._file.write(_CHUNK_HEADER.pack(0, 0, 0))
        length = self._file.tell()
        self._file.seek(len(MAGIC))
        self._file.write(_FILE_HEADER.pack(self._count, length))
        self._file.flush()
        self.finished = True

    def _write_chunk(self) -> None:
        if not self._names:
            return
        names = b"\0".join(self._names)
        headers = b"".join(self._headers)
        ends = array("I", accumulate(map(len, self._headers)))
        self._file.write(_CHUNK_HEADER.pack(len(self._names), len(names), len(headers)))
        for values in (self._sizes, self._inodes):
            self._file.write(array("Q", values).tobytes())
        self._file.write(array("q", self._ctimes).tobytes())
        self._file.write(array("I", self._modes).tobytes())
        self._file.write(ends.tobytes())
        self._file.write(names)
        self._file.write(headers)
        self._count += len(self._names)
        for items in (
            self._names,
            self._sizes,
            self._modes,
            self._inodes,
            self._ctimes,
            self._headers,
        ):
            items.clear()


class MemberList:
    """A member list read from `path`, chunk by chunk; each reading opens it anew."""

    def __init__(self, path: str) -> None:
        """Check what can be checked without reading the chunks: the header and length."""
        if not _USABLE:
            raise MemberListError("member lists are only used on little-endian machines")
        self.path = path
        try:
            with open(path, "rb") as file:
                head = file.read(len(MAGIC) + _FILE_HEADER.size)
                length = os.fstat(file.fileno()).st_size
        except FileNotFoundError:
            raise
        except OSError as error:
            raise MemberListError(error.strerror) from None
        if len(head) != len(MAGIC) + _FILE_HEADER.size or not head.startswith(MAGIC):
            raise MemberListError("not a member list")
        self.count, recorded_length = _FILE_HEADER.unpack_from(head, len(MAGIC))
        if recorded_length != length:
            raise MemberListError(f"{length} bytes long where {recorded_length} were written")

    def chunks(self, *, headers: bool = True) -> Iterator[Chunk]:
        """The chunks in order; without `headers`, their headers are skipped, not read."""
        try:
            with open(self.path, "rb") as file:
                file.seek(len(MAGIC) + _FILE_HEADER.size)
                seen = 0
                while chunk := _read_chunk(file, headers):
                    seen += len(chunk.names)
                    yield chunk
        except OSError as error:
            raise MemberListError(f"{self.path}: {error.strerror}") from None
        if seen != self.count:
            raise MemberListError(f"{self.path}: {seen} members where {self.count} were written")


def _read_chunk(file: BinaryIO, with_headers: bool) -> Chunk | None:
    fixed = file.read(_CHUNK_HEADER.size)
    if len(fixed) != _CHUNK_HEADER.size:
        raise MemberListError(f"{file.name}: ends inside a chunk")
    count, names_length, headers_length = _CHUNK_HEADER.unpack(fixed)
    if count == 0:
        return None
    arrays_length = count * 32  # three 8-byte and two 4-byte values per member
    if count > CHUNK_MEMBERS or arrays_length + names_length + headers_length > _MAX_CHUNK_BYTES:
        raise MemberListError(f"{file.name}: a chunk is larger than any we write")
    wanted = arrays_length + names_length
    data = file.read(wanted)
    if with_headers:
        headers = file.read(headers_length)
    else:
        file.seek(headers_length, os.SEEK_CUR)
        headers = b""
    if len(data) != wanted or (with_headers and len(headers) != headers_length):
        raise MemberListError(f"{file.name}: ends inside a chunk")
    view = memoryview(data)
    wide = 8 * count
    narrow = 4 * count
    ends = view[3 * wide + narrow : 3 * wide + 2 * narrow].cast("I")
    names = bytes(view[arrays_length:]).split(b"\0")
    if len(names) != count or ends[-1] != headers_length:
        raise MemberListError(f"{file.name}: a chunk does not add up")
    return Chunk(
        names=names,
        sizes=view[:wide].cast("Q"),
        inodes=view[wide : 2 * wide].cast("Q"),
        ctimes=view[2 * wide : 3 * wide].cast("q"),
        modes=view[3 * wide : 3 * wide + narrow].cast("I"),
        ends=ends,
        headers=memoryview(headers),
    )
