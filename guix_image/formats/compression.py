"""Compressing layer blobs: reproducible gzip and zstd, one pass, both digests.

Reading compressed blobs is streams.py's; this is the writing side. The
same tar always gives the same blob for a given method, level and library
version, whatever the machine, the thread count or how the tar arrives:

- The tar is cut into fixed pieces (`PIECE`), and each piece is compressed
  on its own, by whichever of a build's workers is free (libzstd, ISA-L and
  zlib release the GIL); the outputs are written in order. A piece's output
  depends only on its bytes, the method and the level, so neither the
  thread count nor how the tar arrives ever shows.
- gzip: the header is written here, the same for every library: no name,
  mtime 0, no extra flags, OS byte 255 ("unknown"). Each piece is raw
  deflate ended by a sync flush (byte-aligned, not final), so the pieces
  join into one deflate stream, closed by an empty final block, as pigz
  does. Levels 1 to 3 use ISA-L's igzip, the fastest deflate measured here
  (about 500 MB/s at a ratio within 12 % of `gzip -6`'s; see
  tests/bench/RESULTS.md); levels 4 to 9 use zlib, as `gzip -4` to `-9`.
- zstd: each piece is a frame of its own (a stream of frames is one zstd
  stream to every decoder). libzstd's own multi-threaded mode was measured
  slower: its workers stood idle a third of the time with jobs small
  enough for the memory target (1 MiB), and each job re-read 256 KiB of
  the one before.

Which library and version made a blob is recorded in a layer annotation
(`label`), so that `verify` can say why a compressed digest differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, OperationError
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

# Input is compressed in pieces of exactly these sizes (see above). zstd in
# frames of 2 MiB gave 0.5 % fewer bytes than `zstd -3` on the large
# benchmark store, 1 MiB frames 0.6 % more; a build holds (workers + 1)
# pieces, 6 MiB with two workers, and its peak was 85 MiB (tests/bench).
PIECE = {"gzip": 1 << 20, "zstd": 2 << 20}
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

    @contextlib.contextmanager
    def compressors(self) -> Iterator[PieceWorkers]:
        """The workers that compress a build's blobs, one blob after another;
        they stop when this ends."""
        assert self.method != "none", "an uncompressed blob is the tar itself"
        workers = PieceWorkers(_piece_compressor(self), PIECE[self.method], _worker_count())
        try:
            yield workers
        finally:
            workers.close()


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
    pieces = f"independent {PIECE[method] >> 20} MiB {'frames' if method == 'zstd' else 'pieces'}"
    if method == "zstd":
        import zstandard

        version = ".".join(map(str, zstandard.ZSTD_VERSION))
        return f"libzstd {version}, python-zstandard {zstandard.__version__}, {pieces}"
    if level in _ISAL_LEVELS:
        import isal

        return f"ISA-L igzip {isal.ISAL_VERSION}, python-isal {isal.__version__}, {pieces}"
    return f"zlib {zlib.ZLIB_RUNTIME_VERSION}, {pieces}"


def _worker_count() -> int:
    """Every core, up to 4 (the machines measured had 2), and never zero."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _piece_compressor(compression: Compression) -> Callable[[memoryview], bytes]:
    """What a worker does with one piece (see the module's docstring)."""
    level = compression.level
    assert level is not None
    if compression.method == "zstd":
        import zstandard

        local = threading.local()  # a worker's own context, reused

        def frame(piece: memoryview) -> bytes:
            compressor = getattr(local, "compressor", None)
            if compressor is None:
                compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
                local.compressor = compressor
            return bytes(compressor.compress(piece))

        return frame
    library: Any = zlib
    if level in _ISAL_LEVELS:
        from isal import isal_zlib

        library = isal_zlib

    def deflate(piece: memoryview) -> bytes:
        compressor = library.compressobj(level, library.DEFLATED, -15)
        return bytes(compressor.compress(piece) + compressor.flush(library.Z_SYNC_FLUSH))

    return deflate


class PieceWorkers:
    """A build's compressing threads: each piece handed to a stream is compressed
    on its own by whichever worker is free, and comes out in order.

    Pieces are copied into buffers allocated once and reused: a new buffer
    per piece, freed by another thread, fragmented the heap (12 MiB more at a
    build's peak, measured). After a failure the workers are closed, not
    reused: a failed stream keeps its buffers.
    """

    def __init__(
        self, compress: Callable[[memoryview], bytes], piece_size: int, workers: int
    ) -> None:
        self.piece_size = piece_size
        self._compress = compress
        # Pieces in flight: one for each worker, and one queued to take next.
        self.depth = workers + 1
        self._buffers = [bytearray(piece_size) for _ in range(self.depth)]
        self._tasks: queue.SimpleQueue[tuple[memoryview, Future[bytes]] | None]
        self._tasks = queue.SimpleQueue()
        # Started now, by the caller: a thread inherits its creator's scheduling
        # priority, and the pipelines' writing thread, which hands the pieces
        # over, runs at a lower one (fastpath/threaded.py).
        self._threads = [
            threading.Thread(target=self._work, name=f"guix-image-compress-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def stream(self) -> PieceStream:
        """The compressor of one blob."""
        return PieceStream(self)

    def submit(self, piece: memoryview | bytearray) -> tuple[Future[bytes], bytearray]:
        """Compress a copy of `piece` (the caller reuses its own buffer); give the
        copy's buffer back with `done` once its output is taken."""
        buffer = self._buffers.pop()
        buffer[: len(piece)] = piece
        future: Future[bytes] = Future()
        self._tasks.put((memoryview(buffer)[: len(piece)], future))
        return future, buffer

    def done(self, buffer: bytearray) -> None:
        self._buffers.append(buffer)

    def close(self) -> None:
        """Stop the workers once they have done what was handed to them."""
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            piece, future = task
            try:
                future.set_result(self._compress(piece))
            except Exception as error:  # handed to the stream, which raises it
                failure = OperationError(f"cannot compress a layer: {error}")
                failure.__cause__ = error
                future.set_exception(failure)


class PieceStream:
    """One blob's pieces: `compress` hands a piece to the workers and returns the
    outputs finished so far, in order; `flush` waits for the rest."""

    def __init__(self, workers: PieceWorkers) -> None:
        self._workers = workers
        self._pending: deque[tuple[Future[bytes], bytearray]] = deque()

    def compress(self, piece: memoryview | bytearray) -> bytes:
        pending = self._pending
        done = []
        while pending and (len(pending) >= self._workers.depth or pending[0][0].done()):
            done.append(self._take())
        pending.append(self._workers.submit(piece))
        return b"".join(done)

    def flush(self) -> bytes:
        return b"".join([self._take() for _ in range(len(self._pending))])

    def _take(self) -> bytes:
        future, buffer = self._pending.popleft()
        output = future.result()
        self._workers.done(buffer)  # only now is its worker done with it
        return output


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

    def __init__(self, fd: int, compression: Compression, workers: PieceWorkers) -> None:
        """`workers`: from `compression.compressors()`, shared by the blobs of a build."""
        self._fd = fd
        self._hash = hashlib.sha256()
        self._size = 0
        self._piece = workers.piece_size
        self._carry = bytearray()  # input short of a whole piece
        self._gzip = compression.method == "gzip"
        self._crc = 0
        self._crc32 = _crc32()
        self._input = 0
        self._stream = workers.stream()
        if self._gzip:
            self._emit(GZIP_HEADER)

    def __call__(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        if self._carry:
            take = min(self._piece - len(self._carry), len(view))
            self._carry += view[:take]
            view = view[take:]
            if len(self._carry) < self._piece:
                return
            self._compress(self._carry)
            self._carry = bytearray()
        piece = self._piece
        whole = len(view) - len(view) % piece
        for start in range(0, whole, piece):
            self._compress(view[start : start + piece])
        self._carry += view[whole:]

    def finish(self) -> Measured:
        """Compress what is left, end the stream: the blob's digest and size."""
        if self._carry or not self._input:  # an empty blob: one empty piece (a zstd frame)
            self._compress(self._carry)
        self._emit(self._stream.flush())
        if self._gzip:  # an empty final block ends the deflate stream; then its check
            self._emit(b"\x03\x00" + struct.pack("<II", self._crc, self._input & 0xFFFFFFFF))
        return Measured(SHA256_PREFIX + self._hash.hexdigest(), self._size)

    def _compress(self, piece: memoryview | bytearray) -> None:
        if self._gzip:
            self._crc = self._crc32(piece, self._crc)
        self._input += len(piece)
        self._emit(self._stream.compress(piece))

    def _emit(self, data: memoryview | bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self._size += len(data)
        write_all(self._fd, memoryview(data))
