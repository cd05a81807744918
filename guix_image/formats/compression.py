"""Compressing layer blobs: reproducible gzip and zstd, one pass, both digests.

Reading compressed blobs is streams.py's; this is the writing side. The
same tar always gives the same blob for a given method, level and library
version, whatever the machine, the thread count or how the tar arrives:

- Input is fed to the compressor in fixed CHUNK-sized pieces: ISA-L's
  output depends on how its input is split (measured), so the split must
  not depend on how the tar was produced.
- gzip: the header is written here, the same for every library: no name,
  mtime 0, no extra flags, OS byte 255 ("unknown"); the body is raw
  deflate. Levels 1 to 3 use ISA-L's igzip, the fastest deflate measured
  here (about 500 MB/s at a ratio within 12 % of `gzip -6`'s; see
  tests/bench/RESULTS.md); levels 4 to 9 use zlib, as `gzip -4` to `-9`.
- zstd: libzstd's streaming multi-threaded mode, whose frames do not depend
  on the number of workers as long as there is one (tested): workers are
  always at least one, and the job size is fixed, so the thread count
  never shows.

Which library and version made a blob is recorded in a layer annotation
(`label`), so that `verify` can say why a compressed digest differs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..files import write_all
from ..model import SHA256_PREFIX, Measured

METHODS = ("none", "gzip", "zstd")
DEFAULT_LEVEL = {"gzip": 2, "zstd": 3}
LEVELS = {"gzip": range(1, 10), "zstd": range(1, 20)}
_ISAL_LEVELS = range(1, 4)  # gzip levels served by ISA-L (its levels 1 to 3)

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPES = {"none": OCI_LAYER, "gzip": OCI_LAYER + "+gzip", "zstd": OCI_LAYER + "+zstd"}
# The layer annotation that names the compressor of a blob built here.
ANNOTATION = "dev.guix-image.layer.compression"

CHUNK = 1 << 20  # input is compressed in pieces of exactly this size (see above)
# zstd's jobs: smaller than its default (4 windows, 8 MiB at level 3), which
# held 66 MiB in two workers' buffers. With 2 MiB jobs a build's peak was 92
# to 105 MiB, with 1 MiB 79 to 85, 3 % slower and 0.2 % bigger (measured on
# the large benchmark store; tests/bench/RESULTS.md).
ZSTD_JOB = 1 << 20
# No name, mtime 0, no extra flags, OS unknown: the same on every machine.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True)
class Compression:
    """How layer blobs are compressed: a method and, unless "none", a level."""

    method: str
    level: int | None = None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.method]

    @property
    def label(self) -> str:
        """What made the bytes: method, level, library and its version (the annotation)."""
        if self.method == "none":
            return "none"
        return f"{self.method} level {self.level} ({_library(self.method, self.level)})"

    def compressors(self) -> Callable[[], Any]:
        """A function giving a new stream compressor (with compress(bytes) -> bytes
        and flush() -> bytes) each time it is called, for one blob after another.

        zstd's streams share one context, its workers and buffers: a context
        per blob left its freed buffers scattered over the heap (about 30 MiB
        more at the peak, measured). Its workers stop once the function is gone.
        """
        assert self.level is not None
        if self.method == "zstd":
            import zstandard

            parameters = zstandard.ZstdCompressionParameters.from_level(
                self.level, threads=_zstd_workers(), job_size=ZSTD_JOB, write_checksum=1
            )
            return zstandard.ZstdCompressor(compression_params=parameters).compressobj
        return self._deflater

    def _deflater(self) -> Any:
        assert self.level is not None
        if self.level in _ISAL_LEVELS:
            from isal import isal_zlib

            return isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, -15)
        return zlib.compressobj(self.level, zlib.DEFLATED, -15)


NONE = Compression("none")


def choose(method: str, level: int | None = None) -> Compression:
    """The compression `method` at `level` (its default if None); InputError if invalid."""
    if method not in METHODS:
        raise InputError(f"unknown compression {method!r}: choose {', '.join(METHODS)}")
    if method == "none":
        if level is not None:
            raise InputError("--compress-level needs --compress gzip or zstd")
        return NONE
    if level is None:
        level = DEFAULT_LEVEL[method]
    levels = LEVELS[method]
    if level not in levels:
        raise InputError(f"{method} levels are {levels.start} to {levels.stop - 1}, not {level}")
    return Compression(method, level)


def parse_label(label: str) -> Compression | None:
    """The compression a `Compression.label` names ("gzip level 2 (...)"), if valid."""
    words = label.split()
    if len(words) >= 3 and words[1] == "level" and words[2].isdigit():
        try:
            return choose(words[0], int(words[2]))
        except InputError:
            return None
    return None


def _library(method: str, level: int | None) -> str:
    if method == "zstd":
        import zstandard

        version = ".".join(map(str, zstandard.ZSTD_VERSION))
        jobs = f"{ZSTD_JOB >> 20} MiB jobs"
        return f"libzstd {version}, python-zstandard {zstandard.__version__}, {jobs}"
    if level in _ISAL_LEVELS:
        import isal

        pieces = f"{CHUNK >> 20} MiB pieces"
        return f"ISA-L igzip {isal.ISAL_VERSION}, python-isal {isal.__version__}, {pieces}"
    return f"zlib {zlib.ZLIB_RUNTIME_VERSION}"


def _zstd_workers() -> int:
    """Both cores (or more), and never zero: see the module's docstring."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _crc32() -> Any:
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - a dependency; zlib's gives the same value
        return zlib.crc32
    return isal_zlib.crc32


class BlobWriter:
    """A sink that compresses what it is given and writes the blob to `fd`,
    hashing the blob on the way (the tar's own digest is the caller's; an
    uncompressed blob is the tar itself, and needs no BlobWriter).

    Call it with each piece of the tar, in order, then `finish`.
    """

    def __init__(
        self, fd: int, compression: Compression, compressor: Callable[[], Any] | None = None
    ) -> None:
        """`compressor`: from `compression.compressors()`, when blobs follow each other."""
        self._fd = fd
        self._compression = compression
        self._hash = hashlib.sha256()
        self._size = 0
        self._carry = bytearray()  # input short of a whole CHUNK
        self._gzip = compression.method == "gzip"
        self._crc = 0
        self._crc32 = _crc32()
        self._input = 0
        assert compression.method != "none", "an uncompressed blob is the tar itself"
        self._compressor = (compressor or compression.compressors())()
        if self._gzip:
            self._emit(GZIP_HEADER)

    def __call__(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        if self._carry:
            take = min(CHUNK - len(self._carry), len(view))
            self._carry += view[:take]
            view = view[take:]
            if len(self._carry) < CHUNK:
                return
            self._compress(self._carry)
            self._carry = bytearray()
        whole = len(view) - len(view) % CHUNK
        for start in range(0, whole, CHUNK):
            self._compress(view[start : start + CHUNK])
        self._carry += view[whole:]

    def finish(self) -> Measured:
        """Compress what is left, end the stream: the blob's digest and size."""
        if self._carry:
            self._compress(self._carry)
        self._emit(self._compressor.flush())
        if self._gzip:
            self._emit(struct.pack("<II", self._crc, self._input & 0xFFFFFFFF))
        return Measured(SHA256_PREFIX + self._hash.hexdigest(), self._size)

    def _compress(self, piece: memoryview | bytearray) -> None:
        if self._gzip:
            self._crc = self._crc32(piece, self._crc)
            self._input += len(piece)
        self._emit(self._compressor.compress(piece))

    def _emit(self, data: memoryview | bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self._size += len(data)
        write_all(self._fd, memoryview(data))
