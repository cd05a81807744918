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
from array import array
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

from ..files import open_regular

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


class MemberListGone(MemberListError):
    """The list found was removed or replaced (by another build) before it was read."""


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

    def __init__(
        self,
        directory: Path,
        tag: bytes,
        on_error: Callable[[OSError], None],
        *,
        chunk_members: int = CHUNK_MEMBERS,
        racy_margin: int = RACY_NS,
    ) -> None:
        import tempfile  # here: a rebuild records no list, and skips the import

        fd, self.path = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=directory)
        self._file = os.fdopen(fd, "wb")
        self._tag = tag
        self._chunk_members = chunk_members  # at most CHUNK_MEMBERS
        self._racy_margin = racy_margin
        self._on_error: Callable[[OSError], None] | None = on_error
        self._members: list[Member] = []
        self._count = 0
        self._newest_ctime = 0
        self.complete = False  # finished, and worth keeping
        self._write(MAGIC + _FILE_HEADER.pack(0, 0, tag))  # rewritten by finish()

    def add(self, member: Member) -> None:
        members = self._members
        members.append(member)
        if len(members) == self._chunk_members:
            self._write_chunk()

    def finish(self, read_since: int) -> None:
        """End the list and close its file. `read_since`: when (`time.time_ns()`) its
        first identity was read: a list holding a ctime too close to it is not kept."""
        self._write_chunk()
        recent = _too_recent(self._newest_ctime, read_since, self._racy_margin)
        if self._on_error is not None and not recent:
            self._write(_CHUNK_HEADER.pack(0, 0, 0))
            try:
                length = self._file.tell()
                self._file.seek(len(MAGIC))
            except OSError as error:
                self._fail(error)
            else:
                self._write(_FILE_HEADER.pack(self._count, length, self._tag))
            self.complete = self._on_error is not None
        try:
            self._file.close()
        except OSError as error:
            self.complete = False
            self._fail(error)

    def commit(self, destination: Path) -> None:
        """Put a complete list at `destination` (atomically), or delete it."""
        if not self.complete:
            self.abort()
            return
        try:
            os.replace(self.path, destination)
        except OSError:
            self.abort()
            raise

    def abort(self) -> None:
        """Delete the list (never raises: it is cleaning up)."""
        with contextlib.suppress(OSError):  # a write failed before: the file goes anyway
            self._file.close()
        with contextlib.suppress(OSError):
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


def _too_recent(ctime: int, read_since: int, margin: int) -> bool:
    """Whether `ctime` is within `margin` ns of `read_since` (2 s for whole seconds)."""
    if ctime % 1_000_000_000 == 0:
        margin = max(margin, _RACY_COARSE_NS)
    return ctime >= read_since - margin


class MemberList:
    """A member list in the cache: checked when found, read chunk by chunk when used.

    No file stays open in between (a build may have hundreds of layers).
    Each reading first checks that the file is still the one found, so a
    list that another build replaced or trimmed meanwhile is never half-used.
    """

    def __init__(self, path: str, tag: bytes) -> None:
        """Check `path`'s header, tag and length; FileNotFoundError if there is none."""
        self.path = path
        fd = _open(path)
        try:
            head = _pread(fd, path, len(MAGIC) + _FILE_HEADER.size, 0)
            if not head.startswith(MAGIC):
                raise MemberListError("not a member list")
            self.count, recorded_length, recorded_tag = _FILE_HEADER.unpack_from(head, len(MAGIC))
            if recorded_tag.rstrip(b"\0") != tag:
                writer = recorded_tag.rstrip(b"\0").decode(errors="replace")
                raise OtherWriter(f"written by {writer}, not {tag.decode()}")
            st = os.fstat(fd)
            if recorded_length != st.st_size:
                raise MemberListError(
                    f"{st.st_size} bytes long where {recorded_length} were written"
                )
            self._identity = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)

    def chunks(self, *, headers: bool = True) -> Iterator[Chunk]:
        """Open the list now and return its chunks, in order.

        Raises MemberListGone at once if the list is not the one found any
        more. Without `headers`, the chunks' headers are skipped, not read.
        """
        try:
            fd = _open(self.path)
        except FileNotFoundError:
            raise MemberListGone(f"{self.path}: removed since it was found") from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity:
                raise MemberListGone(f"{self.path}: replaced since it was found")
        except BaseException:
            os.close(fd)
            raise
        return self._chunks(fd, headers)

    def _chunks(self, fd: int, headers: bool) -> Iterator[Chunk]:
        try:
            offset = len(MAGIC) + _FILE_HEADER.size
            seen = 0
            while True:
                chunk, offset = _read_chunk(fd, self.path, offset, headers)
                if chunk is None:
                    break
                seen += len(chunk.names)
                yield chunk
            if seen != self.count:
                raise MemberListError(
                    f"{self.path}: {seen} members where {self.count} were written"
                )
        finally:
            os.close(fd)


def _open(path: str) -> int:
    try:
        return open_regular(path, follow=False)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise MemberListError(f"{path}: {error.strerror}") from None


def _pread(fd: int, path: str, length: int, offset: int) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as error:
        raise MemberListError(f"{path}: {error.strerror}") from None
    if len(data) != length:
        raise MemberListError(f"{path}: ends inside a chunk")
    return data


def _read_chunk(fd: int, path: str, offset: int, with_headers: bool) -> tuple[Chunk | None, int]:
    """The chunk at `offset`, or None at the end; and the next chunk's offset."""
    count, names_length, headers_length = _CHUNK_HEADER.unpack(
        _pread(fd, path, _CHUNK_HEADER.size, offset)
    )
    offset += _CHUNK_HEADER.size
    if count == 0:
        return None, offset
    arrays_length = count * 32  # three 8-byte and two 4-byte values per member
    if count > CHUNK_MEMBERS or arrays_length + names_length + headers_length > _MAX_CHUNK_BYTES:
        raise MemberListError(f"{path}: a chunk is larger than any we write")
    data = _pread(fd, path, arrays_length + names_length, offset)
    offset += arrays_length + names_length
    headers = _pread(fd, path, headers_length, offset) if with_headers else b""
    offset += headers_length
    view = memoryview(data)
    wide, narrow = 8 * count, 4 * count
    ends = view[3 * wide + narrow : 3 * wide + 2 * narrow].cast("I")
    names = bytes(view[arrays_length:]).split(b"\0")
    modes = view[3 * wide : 3 * wide + narrow].cast("I")
    if (
        len(names) != count
        or ends[-1] != headers_length
        or not _whole_blocks(ends)
        or max(modes) > 0o7777  # permission bits only
    ):
        raise MemberListError(f"{path}: a chunk does not add up")
    chunk = Chunk(
        names=names,
        sizes=view[:wide].cast("Q"),
        inodes=view[wide : 2 * wide].cast("Q"),
        ctimes=view[2 * wide : 3 * wide].cast("q"),
        modes=modes,
        ends=ends,
        headers=memoryview(headers),
    )
    return chunk, offset


def _whole_blocks(ends: memoryview) -> bool:
    """Whether every member's headers are one or more whole 512-byte blocks."""
    start = 0
    for end in ends:
        if end <= start or (end - start) % 512:
            return False
        start = end
    return True
