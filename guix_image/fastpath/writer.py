"""HashingWriter: a byte stream to a file descriptor that hashes chosen spans on the way.

An image archive is one long stream in which each layer is a span whose
SHA-256 must be known by the end. The calling thread fills pooled blocks
(file contents are read straight into them); a pipeline (threaded.py,
forked.py) hashes each full block's spans and writes it, on the other
cores: `hashlib` and `os.write` release the GIL, and the pipeline runs in
a forked child where it can.

What is hashed is what is written: both read the same private copy of the
bytes. (Mapping large files instead of copying them was measured faster but
rejected: a file truncated while mapped kills the process with SIGBUS.)
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from stat import S_IFREG
from typing import Any

from ..errors import FileChanged, GuixImageError, OperationError, SourceError
from .blocks import Block, Sink, can_fork
from .digest import Digest
from .forked import ForkedPipeline
from .threaded import ThreadedPipeline

BLOCK_SIZE = 2 << 20
BLOCK_COUNT = 8  # blocks in flight: one filling, the others hashing and writing

_ZEROS = memoryview(bytes(BLOCK_SIZE))
_PADDING = [bytes(n) for n in range(512)]  # what follows a tar member's last byte
_open, _fstat, _readv, _close = os.open, os.fstat, os.readv, os.close  # the hot path's calls
# Never follow a symlink that replaced a file since the scan, nor wait for a
# fifo's writer.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


# sendfile for copies of at least this much (below it, a drain of the pipeline
# costs more than the copy), unless the kernel cannot for these descriptors.
_SENDFILE_AT_LEAST = 1 << 20
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _check_mode(fd: int, path: bytes, mode: int) -> None:
    try:
        st_mode = os.fstat(fd).st_mode
    except OSError as error:
        raise SourceError(path, error) from None
    if not stat.S_ISREG(st_mode):
        raise FileChanged(f"{os.fsdecode(path)}: no longer a regular file")
    if st_mode & 0o7777 != mode:
        raise FileChanged(f"{os.fsdecode(path)}: its mode is now {st_mode & 0o7777:o}")


def _changed(got: int, expected: int) -> str:
    return "grew" if got > expected else "shrank"


class HashingWriter:
    """Writes a byte stream to `sink`, hashing the spans opened with `begin_digest`.

    `sink` is a file descriptor, or a function that consumes each block.
    `idle` is called while the writer waits for the pipeline, until it
    returns False: the caller's chance to get ahead with other work.
    Use as a context manager; leaving it normally drains and stops the
    pipeline and re-raises its errors. `fork` chooses the pipeline
    (forked.py or threaded.py); by default it is forked where it can be.
    `checkpoint_interval`: how often digests record their SHA-256 state
    (see sha256.py; None: never, as nothing would keep them).

    Reading is the critical path while the store's small files stream, so
    the pipeline's threads run at a lower scheduling priority than the
    caller's (in the forked pipeline; the threaded one lowers only the
    writing thread).
    """

    def __init__(
        self,
        sink: Sink,
        *,
        idle: Callable[[], bool] | None = None,
        block_size: int = BLOCK_SIZE,
        blocks: int = BLOCK_COUNT,
        fork: bool | None = None,
        checkpoint_interval: int | None = None,
    ) -> None:
        if block_size > len(_ZEROS):
            raise ValueError("block_size is larger than the zero buffer")
        self._sink = sink
        self._idle = idle
        self._block_size = block_size
        self._interval = checkpoint_interval
        if fork is None:
            fork = isinstance(sink, int) and can_fork()
        self._pipeline: ThreadedPipeline | ForkedPipeline
        if fork:
            assert isinstance(sink, int)
            try:
                self._pipeline = ForkedPipeline(sink, block_size, blocks, checkpoint_interval)
            except OSError:  # fork failed: threads work too
                fork = False
        if not fork:
            self._pipeline = ThreadedPipeline(sink, block_size, blocks)
        self.forked = fork  # which pipeline runs
        self._digests = 0  # digests begun
        self._digest: Digest | None = None
        self._ended: list[Digest] = []  # spans ended, final at the next drain
        self._span_start = 0
        self._submitted = 0  # bytes already handed to the pipeline
        self._block = self._get_free()

    @property
    def position(self) -> int:
        """Bytes accepted so far."""
        return self._submitted + self._block.length

    # -- the filling side (caller's thread) ---------------------------------

    def begin_digest(self, checkpoints: bytes = b"") -> Digest:
        """Start hashing everything written from now until `end_digest`.

        `checkpoints`: those of the same bytes, if known (see sha256.py).
        """
        if self._digest is not None:
            raise RuntimeError("digest spans do not nest")
        self._digest = Digest(self._digests, checkpoints, self._interval)
        self._digests += 1
        self._span_start = self._block.length
        return self._digest

    def end_digest(self) -> Digest:
        digest = self._digest
        if digest is None:
            raise RuntimeError("no digest span is open")
        self._close_span()
        self._digest = None
        self._ended.append(digest)
        return digest

    def write(self, data: bytes | memoryview) -> None:
        block = self._block
        start = block.length
        end = start + len(data)
        if end <= self._block_size:  # the common case: it fits
            block.buffer[start:end] = data
            block.length = end
            return
        view = memoryview(data)
        while view:
            block = self._room()
            n = min(self._block_size - block.length, len(view))
            block.buffer[block.length : block.length + n] = view[:n]
            block.length += n
            view = view[n:]

    def write_zeros(self, count: int) -> None:
        while count:
            block = self._room()
            n = min(self._block_size - block.length, count)
            block.view[block.length : block.length + n] = _ZEROS[:n]
            block.length += n
            count -= n

    def write_file(
        self, header: bytes | memoryview, path: bytes, size: int, mode: int | None = None
    ) -> None:
        """Write a tar member: `header`, the `size` bytes of the file at `path`, padding.

        The hot path of a build: a small file is read straight into the block
        with one system call. Raises SourceError if the file cannot be read
        and FileChanged if its size is not `size`, or, given a `mode`, if it
        is not a regular file with those permission bits.
        """
        block = self._block
        start = block.length
        content = start + len(header)
        end = content + size
        padded_end = end + -size % 512
        if padded_end < self._block_size:  # it all fits, with a byte to spare
            try:
                fd = _open(path, _OPEN_FLAGS)
                try:
                    if mode is not None and _fstat(fd).st_mode ^ S_IFREG != mode:
                        _check_mode(fd, path, mode)  # says how it changed
                    got = _readv(fd, [block.view[content : end + 1]])
                finally:
                    _close(fd)
            except OSError as error:
                raise SourceError(path, error) from None
            if got != size:
                raise FileChanged(
                    f"{os.fsdecode(path)}: file {_changed(got, size)} while it was being read"
                )
            block.buffer[start:content] = header
            block.buffer[end:padded_end] = _PADDING[padded_end - end]
            block.length = padded_end
            return
        padding = padded_end - end
        self.write(header)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as error:
            raise SourceError(path, error) from None
        try:
            if mode is not None:
                _check_mode(fd, path, mode)
            self.copy_from_fd(fd, size, os.fsdecode(path))
        finally:
            os.close(fd)
        self.write_zeros(padding)

    def copy_from_fd(self, fd: int, size: int, name: str, *, at_eof: bool = True) -> None:
        """Copy exactly `size` bytes from `fd`'s current offset.

        Raises SourceError, naming `name`, if it cannot be read, FileChanged
        if the file is shorter, or (when `at_eof`: the file should end there)
        longer.

        Bytes that nothing hashes (no digest span is open), going to a file
        descriptor, are handed to the kernel to copy (sendfile): an archive's
        blobs made by the same build, which the copy through the blocks and
        the pipeline cost about 1 s of CPU per GB (measured).
        """
        if size >= _SENDFILE_AT_LEAST and self._digest is None and isinstance(self._sink, int):
            size = self._send_file(fd, size, name)  # what is left: the loop checks for growth
        remaining = size
        slack = 1 if at_eof else 0
        readv = os.readv
        while True:
            block = self._room()
            start = block.length
            # Ask for one byte more than we need when there is room: a regular
            # file at EOF returns short, so growth is caught without a second read.
            want = min(self._block_size - start, remaining + slack)
            try:
                got = readv(fd, [block.view[start : start + want]])
            except OSError as error:
                raise SourceError(name, error) from None
            if got > remaining or (got == 0 and remaining):
                raise FileChanged(
                    f"{name}: file {_changed(got, remaining)} while it was being read"
                )
            if got == 0:
                return
            block.length = start + got
            remaining -= got
            if remaining == 0 and (want > got or not at_eof):
                return  # a short read of a regular file means EOF

    def _send_file(self, fd: int, size: int, name: str) -> int:
        """Copy up to `size` bytes of `fd` straight to the sink, once everything
        before them is written; what is left to copy otherwise (all of it where
        the kernel cannot: the caller copies it through the blocks)."""
        assert isinstance(self._sink, int)
        self._submit()
        self._block = self._get_free()
        self._call(self._pipeline.drain)  # all before is written: the order holds
        self._finalise()
        remaining = size
        while remaining:
            try:
                sent = os.sendfile(self._sink, fd, None, remaining)
            except OSError as error:
                if remaining == size and error.errno in _NO_SENDFILE:
                    return size
                if isinstance(error, BrokenPipeError):
                    raise
                raise OperationError(
                    f"cannot write the output ({name}): {error.strerror}"
                ) from None
            if sent == 0:
                raise FileChanged(f"{name}: file shrank while it was being read")
            remaining -= sent
            self._submitted += sent
        return 0

    def drain(self) -> None:
        """Wait until everything written so far is hashed (digests become final)
        and written."""
        self._submit()
        self._block = self._get_free()
        self._call(self._pipeline.drain)
        self._finalise()

    def close(self) -> None:
        """Hash and write everything, stop the pipeline, re-raise its errors."""
        try:
            self._submit()
            self._block = Block(bytearray(0))  # nothing is being filled any more
            self._call(self._pipeline.close)
        except BaseException:
            self.abort()
            raise
        self._finalise()

    def _finalise(self) -> None:
        """Every span ended so far is hashed: its digest is final."""
        for digest in self._ended:
            digest.final = True
        self._ended.clear()

    def abort(self) -> None:
        """Stop the pipeline without caring what was written."""
        # A write to a file ends; a pipe with nobody reading may not, and we
        # must not hang on SIGTERM: give up on it after a while.
        patience = None if isinstance(self._sink, int) and _is_regular(self._sink) else 5
        self._pipeline.abort(patience)

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _room(self) -> Block:
        """The current block, or a fresh one if it is full."""
        block = self._block
        if block.length < self._block_size:
            return block
        self._submit()
        self._block = self._get_free()
        return self._block

    def _close_span(self) -> None:
        block = self._block
        if self._digest is not None and block.length > self._span_start:
            block.spans.append((self._span_start, block.length, self._digest))
        self._span_start = 0

    def _submit(self) -> None:
        self._close_span()
        self._submitted += self._block.length
        self._call(self._pipeline.submit, self._block)

    def _get_free(self) -> Block:
        while True:
            self._raise_if_failed()
            block: Block | None = self._call(self._pipeline.free_block, 0)
            if block is None and self._idle is not None and self._idle():
                continue
            if block is None:
                block = self._call(self._pipeline.free_block, 0.5)
            if block is not None:
                block.length = 0
                block.spans = []
                return block

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Call the pipeline; what it fails with is raised as the caller should see it."""
        try:
            result = method(*args)
        except BaseException as error:
            if error is not self._pipeline.error:
                raise
            result = None
        self._raise_if_failed()
        return result

    def _raise_if_failed(self) -> None:
        error = self._pipeline.error
        if error is not None:
            if isinstance(error, GuixImageError | BrokenPipeError):
                raise error  # a closed pipe: the reader stopped, we stop too
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise OperationError(f"cannot write the output: {reason}") from error
