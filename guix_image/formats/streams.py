"""Small readable streams the readers compose: slices, hashing, decompression.

Every reader here is bounded: a slice never reads past its end, and a
decompressor fails with an ArchiveError instead of inflating without limit.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zlib
from typing import Any, BinaryIO, cast

from ..errors import ArchiveError
from ..model import SHA256_PREFIX
from .limits import MAX_RATIO, RATIO_ALLOWANCE

CHUNK = 1 << 20

_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


def detect_compression(head: bytes) -> str:
    """ "gzip", "zstd", "bzip2", "xz" or "none", from a stream's first bytes."""
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


class SliceReader(io.RawIOBase):
    """A read-only, seekable view of `size` bytes of `file` from `offset`; owns `file`."""

    def __init__(self, file: BinaryIO, offset: int, size: int) -> None:
        self._file, self._offset, self._size = file, offset, size
        self._position = 0
        self._file_position = -1  # where `file` is, to skip needless seeks

    def close(self) -> None:
        super().close()
        self._file.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def pread(self, size: int, position: int) -> bytes:
        """Up to `size` bytes from `position` in the slice, without moving."""
        size = min(size, self._size - position)
        if size <= 0:
            return b""
        return os.pread(self._file.fileno(), size, self._offset + position)

    def digest(self) -> tuple[str, int]:
        """sha256 and size of the whole slice, read in large blocks without moving."""
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(CHUNK))
        fd, position = self._file.fileno(), 0
        while position < self._size:
            got = os.preadv(
                fd, [buffer[: min(CHUNK, self._size - position)]], self._offset + position
            )
            if not got:
                break
            digest.update(buffer[:got])
            position += got
        return SHA256_PREFIX + digest.hexdigest(), position

    def read(self, size: int = -1) -> bytes:
        want = self._size - self._position if size < 0 else min(size, self._size - self._position)
        if want <= 0:
            return b""
        if self._file_position != self._position:
            self._file.seek(self._offset + self._position)
        data = self._file.read(want)
        self._position += len(data)
        self._file_position = self._position
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._position)
        if want <= 0:
            return 0
        if self._file_position != self._position:
            self._file.seek(self._offset + self._position)
        got = self._file.readinto(view[:want]) or 0  # type: ignore[attr-defined]
        self._position += got
        self._file_position = self._position
        return got


class HashingReader(io.RawIOBase):
    """Passes reads through, counting (and unless told not to, hashing) every byte."""

    def __init__(self, inner: BinaryIO, *, hashing: bool = True) -> None:
        self._inner = inner
        self.hashing = hashing
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._inner.readinto(view) or 0  # type: ignore[attr-defined]
        if self.hashing and n:
            self.hash.update(view[:n])
        self.size += n
        return n

    def read_to_end(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return SHA256_PREFIX + self.hash.hexdigest()


class _Counting(io.RawIOBase):
    """Passes reads through, counting the bytes."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer) or 0  # type: ignore[attr-defined]
        self.count += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.count += len(data)
        return data


class Decompressor(io.RawIOBase):
    """Inflates a gzip, zstd, xz or bzip2 stream (of one or more members), refusing
    bombs: at no point may it have produced more than MAX_RATIO times what it has
    read (or the compressed size, if known), beyond a small allowance."""

    def __init__(self, inner: BinaryIO, kind: str, name: str, compressed_size: int | None) -> None:
        self._inner = _Counting(inner)
        self._kind, self._name = kind, name
        self._known_size = compressed_size or 0
        self._produced = 0
        self._pending = b""
        self._eof = False
        if kind == "zstd":
            try:
                import zstandard
            except ImportError:  # pragma: no cover - it is a dependency
                raise ArchiveError(f"{name}: zstd data needs the zstandard package") from None
            reader = zstandard.ZstdDecompressor().stream_reader
            self._zstd = reader(cast(BinaryIO, self._inner), read_across_frames=True)
        elif kind in _DECODERS:
            self._decoder: Any = _DECODERS[kind]()
        else:
            raise ArchiveError(f"{name}: {kind} compressed data is not supported")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        view[: len(data)] = data
        self._produced += len(data)
        limit = MAX_RATIO * max(self._known_size, self._inner.count) + RATIO_ALLOWANCE
        if self._produced > limit:
            raise ArchiveError(
                f"{self._name}: decompression stopped at {self._produced} bytes, over "
                f"{MAX_RATIO} times the compressed size (a decompression bomb?)"
            )
        return len(data)

    def _read(self, size: int) -> bytes:
        if self._kind == "zstd":
            try:
                return bytes(self._zstd.read(size))
            except Exception as error:  # zstandard.ZstdError and friends
                raise ArchiveError(f"{self._name}: bad zstd data: {error}") from None
        while not self._pending and not self._eof:
            try:
                self._pending = self._inflate(size)
            except _decode_errors() as error:
                raise ArchiveError(f"{self._name}: bad {self._kind} data: {error}") from None
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def _inflate(self, size: int) -> bytes:
        """Up to `size` more bytes (perhaps none yet), member after member."""
        decoder = self._decoder
        if decoder.eof:  # a member ended: another may follow
            rest = decoder.unused_data or self._inner.read(CHUNK)
            if not rest.strip(b"\0"):
                self._eof = True
                return b""
            self._decoder = _DECODERS[self._kind]()
            return bytes(self._decoder.decompress(rest, size))
        if self._kind == "gzip" and decoder.unconsumed_tail:
            return bytes(decoder.decompress(decoder.unconsumed_tail, size))
        if self._kind != "gzip" and not decoder.needs_input:
            return bytes(decoder.decompress(b"", size))  # output it holds back
        chunk = self._inner.read(CHUNK)
        if not chunk:
            raise EOFError(f"the stream ends too early, {self._inner.count} bytes in")
        return bytes(decoder.decompress(chunk, size))


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What the decoders raise on bad data (lzma's own only once it is loaded)."""
    lzma = sys.modules.get("lzma")
    return (zlib.error, OSError, EOFError, *((lzma.LZMAError,) if lzma else ()))


def _lzma() -> Any:
    import lzma  # here: xz archives are rare, and the module costs a start-up

    return lzma.LZMADecompressor()


def _bz2() -> Any:
    import bz2

    return bz2.BZ2Decompressor()


_DECODERS: dict[str, Any] = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "xz": _lzma,
    "bzip2": _bz2,
}


def peek_compression(stream: BinaryIO) -> tuple[BinaryIO, str]:
    """The compression a stream uses, and the stream, still at its start.

    A seekable stream stays seekable (so a reader can skip over contents);
    another is wrapped in a buffer to look ahead.
    """
    if stream.seekable():
        head = stream.read(8)
        stream.seek(0)
        return stream, detect_compression(head)
    buffered = io.BufferedReader(cast(io.RawIOBase, stream), CHUNK)
    return cast(BinaryIO, buffered), detect_compression(buffered.peek(8)[:8])


def inflate(stream: BinaryIO, kind: str, name: str, size: int | None) -> BinaryIO:
    """A buffered stream of the uncompressed bytes of a `kind` compressed stream."""
    return cast(BinaryIO, io.BufferedReader(Decompressor(stream, kind, name, size), CHUNK))


def open_layer(stream: BinaryIO, name: str, size: int | None) -> tuple[BinaryIO, str]:
    """The uncompressed bytes of a layer blob, and the compression it used."""
    stream, kind = peek_compression(stream)
    return (stream if kind == "none" else inflate(stream, kind, name, size)), kind
