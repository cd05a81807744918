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


# A member: its tar header(s), content size, name, mode, and identity on disk
# (inode, ctime in nanoseconds; 0 and 0 for what is not on disk).
Member = tuple[bytes, int, bytes, int, int, int]


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
        self._members: list[Member] = []
        self.finished = False

    def add(self, member: Member) -> None:
        self._members.append(member)
        if len(self._members) == CHUNK_MEMBERS:
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
        if not self._members:
            return
        headers, sizes, names, modes, inodes, ctimes = zip(*self._members, strict=True)
        joined_names = b"\0".join(names)
        joined_headers = b"".join(headers)
        write = self._file.write
        write(_CHUNK_HEADER.pack(len(names), len(joined_names), len(joined_headers)))
        write(array("Q", sizes).tobytes())
        write(array("Q", inodes).tobytes())
        write(array("q", ctimes).tobytes())
        write(array("I", modes).tobytes())
        write(array("I", accumulate(map(len, headers))).tobytes())
        write(joined_names)
        write(joined_headers)
        self._count += len(names)
        self._members.clear()


class MemberList:
    """A member list, read chunk by chunk from a file held open.

    Holding the file keeps it readable while another build replaces or
    trims it; positional reads let two readings go on at once.
    """

    def __init__(self, path: str) -> None:
        """Open `path` and check its header and length; FileNotFoundError if it is not there."""
        if not _USABLE:
            raise MemberListError("member lists are only used on little-endian machines")
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise MemberListError(error.strerror) from None
        try:
            head = self._pread(len(MAGIC) + _FILE_HEADER.size, 0)
            if not head.startswith(MAGIC):
                raise MemberListError("not a member list")
            self.count, recorded_length = _FILE_HEADER.unpack_from(head, len(MAGIC))
            length = os.fstat(self._fd).st_size
            if recorded_length != length:
                raise MemberListError(f"{length} bytes long where {recorded_length} were written")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def chunks(self, *, headers: bool = True) -> Iterator[Chunk]:
        """The chunks in order; without `headers`, their headers are skipped, not read."""
        offset = len(MAGIC) + _FILE_HEADER.size
        seen = 0
        while True:
            chunk, offset = self._read_chunk(offset, headers)
            if chunk is None:
                break
            seen += len(chunk.names)
            yield chunk
        if seen != self.count:
            raise MemberListError(f"{self.path}: {seen} members where {self.count} were written")

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as error:
            raise MemberListError(f"{self.path}: {error.strerror}") from None
        if len(data) != length:
            raise MemberListError(f"{self.path}: ends inside a chunk")
        return data

    def _read_chunk(self, offset: int, with_headers: bool) -> tuple[Chunk | None, int]:
        """The chunk at `offset`, or None at the end; and the next chunk's offset."""
        fixed = self._pread(_CHUNK_HEADER.size, offset)
        offset += _CHUNK_HEADER.size
        count, names_length, headers_length = _CHUNK_HEADER.unpack(fixed)
        if count == 0:
            return None, offset
        arrays_length = count * 32  # three 8-byte and two 4-byte values per member
        chunk_length = arrays_length + names_length + headers_length
        if count > CHUNK_MEMBERS or chunk_length > _MAX_CHUNK_BYTES:
            raise MemberListError(f"{self.path}: a chunk is larger than any we write")
        data = self._pread(arrays_length + names_length, offset)
        offset += arrays_length + names_length
        headers = self._pread(headers_length, offset) if with_headers else b""
        offset += headers_length
        view = memoryview(data)
        wide = 8 * count
        narrow = 4 * count
        ends = view[3 * wide + narrow : 3 * wide + 2 * narrow].cast("I")
        names = bytes(view[arrays_length:]).split(b"\0")
        if len(names) != count or ends[-1] != headers_length:
            raise MemberListError(f"{self.path}: a chunk does not add up")
        chunk = Chunk(
            names=names,
            sizes=view[:wide].cast("Q"),
            inodes=view[wide : 2 * wide].cast("Q"),
            ctimes=view[2 * wide : 3 * wide].cast("q"),
            modes=view[3 * wide : 3 * wide + narrow].cast("I"),
            ends=ends,
            headers=memoryview(headers),
        )
        return chunk, offset
