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

    header:  MAGIC, u64 member count, u64 file length, and a 64-byte tag
             naming the code that wrote it (a list from other code is unused)
    chunk:   u32 member count, u32 names length, u32 headers length, then
             the members' content sizes (u64 each), inodes (u64), ctimes in
             ns (i64), modes (u32), the end of each member's headers in the
             chunk's headers (u32), their names joined by NUL, their headers
    end:     a chunk of count 0

Integers are little-endian; a list written elsewhere is only ever unusable.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
from array import array
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

MAGIC = b"guix-image member list 1\n"
_FILE_HEADER = struct.Struct("<QQ64s")
_CHUNK_HEADER = struct.Struct("<III")
CHUNK_MEMBERS = 4096  # about 3 MiB of headers and names per chunk
# Above what 4096 members can take: names and link targets are at most
# PATH_MAX (4096) bytes, so a member's headers at most about 10 KiB.
_MAX_CHUNK_BYTES = 128 << 20
USABLE = sys.byteorder == "little"  # the arrays are read in native order
TEMPORARY_PREFIX = ".members-"
# A change in the same clock tick as the scan that read a ctime may leave the
# ctime as it was (git's "racily clean" entries). A list holding a ctime that
# recent is not kept. Nanosecond timestamps advance at least every 10 ms;
# whole-second ones (ext3, FAT: 2 s) are told apart by their zero nanoseconds.
RACY_NS = 100_000_000
_RACY_COARSE_NS = 2_000_000_000

# A member: its tar header(s), content size, name, mode, and identity on disk
# (inode, ctime in nanoseconds; 0 and 0 for what is not on disk).
Member = tuple[bytes, int, bytes, int, int, int]


class MemberListError(Exception):
    """A member list that cannot be read as one: it is ignored or the build fails."""


class OtherWriter(MemberListError):
    """A list written by other code (another version): not to be used, not an error."""


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
    """Records a layer's members, in order, into a new temporary file in `directory`.

    Creating it raises OSError if the file cannot be created. A later write
    error does not stop the build: the first is passed to `on_error`, and
    the list is not kept.
    """

    def __init__(self, directory: Path, tag: bytes, on_error: Callable[[OSError], None]) -> None:
        fd, self.path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=directory)
        self._file = os.fdopen(fd, "wb")
        self._tag = tag
        self._on_error: Callable[[OSError], None] | None = on_error
        self._members: list[Member] = []
        self._count = 0
        self._newest_ctime = 0
        self.complete = False  # finished, and worth keeping
        self._write(MAGIC + _FILE_HEADER.pack(0, 0, tag))  # rewritten by finish()

    def add(self, member: Member) -> None:
        members = self._members
        members.append(member)
        if len(members) == CHUNK_MEMBERS:
            self._write_chunk()

    def finish(self, read_since: int) -> None:
        """End the list. `read_since`: when (`time.time_ns()`) its first identity was read."""
        self._write_chunk()
        if self._on_error is None or _too_recent(self._newest_ctime, read_since):
            return
        self._write(_CHUNK_HEADER.pack(0, 0, 0))
        try:
            length = self._file.tell()
            self._file.seek(len(MAGIC))
        except OSError as error:
            self._fail(error)
        self._write(_FILE_HEADER.pack(self._count, length, self._tag))
        try:
            self._file.flush()
        except OSError as error:
            self._fail(error)
        self.complete = self._on_error is not None

    def commit(self, destination: Path) -> None:
        """Put a complete list at `destination` (atomically), or delete it."""
        if not self.complete:
            self.abort()
            return
        self._file.close()
        try:
            os.replace(self.path, destination)
        except OSError:
            self.abort()
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a write failed before: the file goes anyway
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write_chunk(self) -> None:
        if not self._members or self._on_error is None:
            self._members.clear()
            return
        headers, sizes, names, modes, inodes, ctimes = zip(*self._members, strict=True)
        self._members.clear()
        self._newest_ctime = max(self._newest_ctime, *ctimes)
        joined_names = b"\0".join(names)
        joined_headers = b"".join(headers)
        self._write(_CHUNK_HEADER.pack(len(names), len(joined_names), len(joined_headers)))
        self._write(array("Q", sizes).tobytes())
        self._write(array("Q", inodes).tobytes())
        self._write(array("q", ctimes).tobytes())
        self._write(array("I", modes).tobytes())
        self._write(array("I", accumulate(map(len, headers))).tobytes())
        self._write(joined_names)
        self._write(joined_headers)
        self._count += len(names)

    def _write(self, data: bytes) -> None:
        if self._on_error is not None:
            try:
                self._file.write(data)
            except OSError as error:
                self._fail(error)

    def _fail(self, error: OSError) -> None:
        if self._on_error is not None:
            on_error, self._on_error = self._on_error, None
            on_error(error)


def _too_recent(ctime: int, read_since: int) -> bool:
    margin = _RACY_COARSE_NS if ctime % 1_000_000_000 == 0 else RACY_NS
    return ctime >= read_since - margin


class MemberList:
    """A member list, read chunk by chunk from a file held open.

    Holding the file keeps it readable while another build replaces or
    trims it; positional reads let two readings go on at once.
    """

    def __init__(self, path: str, tag: bytes) -> None:
        """Open `path`, check its header, tag and length; FileNotFoundError if there is none."""
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
            self.count, recorded_length, recorded_tag = _FILE_HEADER.unpack_from(head, len(MAGIC))
            if recorded_tag.rstrip(b"\0") != tag:
                writer = recorded_tag.rstrip(b"\0").decode(errors="replace")
                raise OtherWriter(f"written by {writer}, not {tag.decode()}")
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
