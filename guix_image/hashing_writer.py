"""A byte stream to a file descriptor that hashes chosen spans on the way.

An image archive is one long stream in which each layer is a span whose
SHA-256 must be known by the end. The writer fills large blocks in the
calling thread (file contents are read straight into them), then hands each
full block to a hashing thread and from there to a writing thread.
`hashlib` and `os.write` release the GIL, so reading, hashing and writing run
on different cores, and every byte is copied from the page cache once.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from .errors import GuixImageError, OperationError

BLOCK_SIZE = 4 << 20
BLOCK_COUNT = 4  # blocks in flight: one filling, the others hashing and writing


class Digest:
    """The SHA-256 of one span of the stream, complete once the writer is drained."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class FileChanged(OperationError):
    """A file's size changed between the scan that planned the archive and the copy."""


class _Block:
    __slots__ = ("buffer", "length", "spans", "view")

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.length = 0
        self.spans: list[tuple[int, int, Digest]] = []


_STOP = None


Sink = int | Callable[[memoryview], Any]


class HashingWriter:
    """Writes a byte stream to `sink`, hashing the spans opened with `begin_digest`.

    `sink` is a file descriptor, or a function that consumes each block.

    Use as a context manager; leaving it normally drains and joins the
    threads and re-raises their errors. `position` counts bytes accepted.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        block_size: int = BLOCK_SIZE,
        blocks: int = BLOCK_COUNT,
    ) -> None:
        self._sink = sink
        self._block_size = block_size
        self._free: queue.Queue[_Block] = queue.Queue()
        for _ in range(blocks):
            self._free.put(_Block(block_size))
        self._to_hash: queue.Queue[_Block | None] = queue.Queue()
        self._to_write: queue.Queue[_Block | None] = queue.Queue()
        self._error: BaseException | None = None
        self._digest: Digest | None = None
        self._span_start = 0
        self.position = 0
        self._block = self._free.get()
        self._threads = [
            threading.Thread(target=self._hash_loop, name="guix-image-hash", daemon=True),
            threading.Thread(target=self._write_loop, name="guix-image-write", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- the filling side (caller's thread) ---------------------------------

    def begin_digest(self) -> Digest:
        """Start hashing everything written from now until `end_digest`."""
        if self._digest is not None:
            raise RuntimeError("digest spans do not nest")
        self._digest = Digest()
        self._span_start = self._block.length
        return self._digest

    def end_digest(self) -> Digest:
        digest = self._digest
        if digest is None:
            raise RuntimeError("no digest span is open")
        self._close_span()
        self._digest = None
        return digest

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            block = self._block
            room = self._block_size - block.length
            if room == 0:
                block = self._next_block()
                room = self._block_size
            n = min(room, len(view))
            block.buffer[block.length : block.length + n] = view[:n]
            block.length += n
            self.position += n
            view = view[n:]

    def write_zeros(self, count: int) -> None:
        while count:
            block = self._block
            room = self._block_size - block.length
            if room == 0:
                block = self._next_block()
                room = self._block_size
            n = min(room, count)
            block.view[block.length : block.length + n] = bytes(n)
            block.length += n
            self.position += n
            count -= n

    def copy_from_fd(self, fd: int, size: int, name: str, *, at_eof: bool = True) -> None:
        """Copy exactly `size` bytes from `fd`'s current offset.

        Raises FileChanged, naming `name`, if the file is shorter, or (when
        `at_eof`, the file should end there) longer.
        """
        remaining = size
        slack = 1 if at_eof else 0
        while True:
            block = self._block
            room = self._block_size - block.length
            if room == 0:
                block = self._next_block()
                room = self._block_size
            # Ask for one byte more than we need when there is room: a regular
            # file at EOF returns short, so growth is caught without a second read.
            want = min(room, remaining + slack)
            got = os.readv(fd, [block.view[block.length : block.length + want]])
            if got > remaining:
                raise FileChanged(f"{name}: file grew while it was being read")
            if got == 0:
                if remaining:
                    raise FileChanged(f"{name}: file shrank while it was being read")
                return
            block.length += got
            self.position += got
            remaining -= got
            if remaining == 0 and (want > got or not at_eof):
                return  # a short read of a regular file means EOF

    def drain(self) -> None:
        """Wait until everything written so far is hashed (digests become final)."""
        self._submit()
        self._block = self._get_free()
        self._to_hash.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Hash and write everything, stop the threads, re-raise their errors."""
        self._submit()
        self._to_hash.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop the threads without caring what was written."""
        if self._error is None:
            self._error = OperationError("aborted")
        self._to_hash.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _close_span(self) -> None:
        block = self._block
        if self._digest is not None and block.length > self._span_start:
            block.spans.append((self._span_start, block.length, self._digest))
        self._span_start = 0

    def _next_block(self) -> _Block:
        self._submit()
        self._block = self._get_free()
        return self._block

    def _submit(self) -> None:
        self._close_span()
        self._to_hash.put(self._block)

    def _get_free(self) -> _Block:
        while True:
            self._raise_if_failed()
            try:
                block = self._free.get(timeout=0.5)
            except queue.Empty:
                continue
            block.length = 0
            block.spans = []
            return block

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, GuixImageError):
                raise self._error
            raise OperationError(f"cannot write the output: {self._error}") from self._error

    # -- the worker threads ---------------------------------------------------

    def _hash_loop(self) -> None:
        while True:
            block = self._to_hash.get()
            try:
                if block is not None and self._error is None:
                    for start, end, digest in block.spans:
                        digest.update(block.view[start:end])
            except BaseException as error:
                self._error = error
            finally:
                self._to_write.put(block)
                self._to_hash.task_done()
            if block is None:
                return

    def _write_loop(self) -> None:
        while True:
            block = self._to_write.get()
            if block is None:
                return
            try:
                if self._error is None:
                    self._write_all(block.view[: block.length])
            except BaseException as error:
                self._error = error
            finally:
                self._free.put(block)

    def _write_all(self, view: memoryview) -> None:
        if not isinstance(self._sink, int):
            self._sink(view)
            return
        while view:
            written = os.write(self._sink, view)
            view = view[written:]
