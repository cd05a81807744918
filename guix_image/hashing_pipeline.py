"""Where HashingWriter's full blocks go: hashed, written in order, then reused.

A pipeline owns a pool of blocks. The writer's thread takes a free block,
fills it, and submits it with its spans (the parts of it that belong to a
digest); the pipeline hashes the spans, writes the block, and frees it.
What is hashed is what is written: both read the same private copy of the
bytes, which is not reused before both are done with it.

Two pipelines do this:
- ThreadedPipeline: a hashing thread and a writing thread in this process.
- ForkedPipeline: the same two threads in a forked child, the blocks in
  memory shared with it. Python threads share one lock (the GIL): while
  the filling thread opens and reads thousands of small files, every hand
  over of that lock to the hashing or writing thread costs it a wake-up.
  In a child process they have their own lock and the filling thread runs
  undisturbed (the benchmark's layer of 21,000 small files streams about a
  tenth faster). It needs `fork`, a file descriptor to write to, and no
  other thread running when it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import select
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any

from .errors import OperationError

Sink = int | Callable[[memoryview], Any]


class Digest:
    """The SHA-256 of one span of the stream, complete once the writer is drained."""

    def __init__(self, number: int = 0) -> None:
        self.number = number  # its place among the writer's digests
        self.size = 0
        self._hash = hashlib.sha256()
        self._hex: str | None = None  # set when it was computed elsewhere

    def update(self, data: memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hex if self._hex is not None else self._hash.hexdigest()

    def computed(self, digest: bytes) -> None:
        """Take the digest computed by another process for the same bytes."""
        self._hex = digest.hex()


Span = tuple[int, int, Digest]  # start and end in the block, and whose span


class Block:
    """A pooled buffer: filled by the caller's thread, then hashed and written."""

    __slots__ = ("buffer", "index", "length", "spans", "view")

    def __init__(self, buffer: bytearray | memoryview, index: int = 0) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.index = index
        self.length = 0
        self.spans: list[Span] = []


def lower_priority(step: int = 5) -> None:
    """Make the calling thread yield the CPU to the others (Linux: a thread's nice value)."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + step)
    except (OSError, AttributeError):
        pass  # not supported here: only slower


def can_fork(sink: Sink) -> bool:
    return isinstance(sink, int) and hasattr(os, "fork") and only_thread()


def only_thread() -> bool:
    """Whether this process runs one thread: forking one that runs more can
    deadlock its child."""
    try:  # also sees threads started without the threading module
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


def write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


class ThreadedPipeline:
    """Hashes and writes blocks with two threads of this process."""

    def __init__(self, sink: Sink, block_size: int, blocks: int) -> None:
        self._sink = sink
        self._block_size = block_size
        self._unallocated = blocks  # allocated when first needed: a small build needs few
        self._free: queue.Queue[Block] = queue.Queue()
        self._to_hash: queue.Queue[Block | None] = queue.Queue()
        self._to_write: queue.Queue[Block | None] = queue.Queue()
        self.error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._hash_loop, name="guix-image-hash", daemon=True),
            threading.Thread(target=self._write_loop, name="guix-image-write", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def free_block(self, timeout: float | None) -> Block | None:
        """A free block; None if none came within `timeout` seconds (0: do not wait)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._unallocated:
            self._unallocated -= 1
            return Block(bytearray(self._block_size))
        if timeout == 0:
            return None
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            return None

    def submit(self, block: Block) -> None:
        self._to_hash.put(block)

    def drain(self) -> None:
        self._to_hash.join()

    def close(self) -> None:
        self._to_hash.put(None)
        for thread in self._threads:
            thread.join()

    def abort(self, patience: float | None) -> None:
        if self.error is None:
            self.error = InterruptedError("aborted")
        self._to_hash.put(None)
        for thread in self._threads:
            thread.join(timeout=patience)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def _hash_loop(self) -> None:
        while True:
            block = self._to_hash.get()
            try:
                if block is not None and self.error is None:
                    for start, end, digest in block.spans:
                        digest.update(block.view[start:end])
            except BaseException as error:  # handed to the caller
                self._fail(error)
            finally:
                self._to_write.put(block)
                self._to_hash.task_done()
            if block is None:
                return

    def _write_loop(self) -> None:
        lower_priority()
        while True:
            block = self._to_write.get()
            if block is None:
                return
            try:
                if self.error is None:
                    if isinstance(self._sink, int):
                        write_all(self._sink, block.view[: block.length])
                    else:
                        self._sink(block.view[: block.length])
            except BaseException as error:  # handed to the caller
                self._fail(error)
            finally:
                self._free.put(block)


# The conversation between the forked child and its parent, over two pipes.
# Parent to child: a command, then a block's spans (start, end, digest number).
_COMMAND = struct.Struct("<IIII")  # kind, and for a block: index, length, span count
_SPAN = struct.Struct("<III")
_BLOCK, _DRAIN, _CLOSE = 1, 2, 3
# Child to parent: a message, each one written at once (atomic in a pipe).
_MESSAGE = struct.Struct("<II")  # kind, value
_FREE, _DIGEST, _DRAINED, _FAILED, _CLOSED = 1, 2, 3, 4, 5
_DIGEST_SIZE = 32  # a _DIGEST message (value: the digest's number) carries one
_STOPPED = "the hashing process stopped unexpectedly"


class ChildFailed(OperationError):
    """The forked hashing process stopped, or failed other than writing."""


class ForkedPipeline:
    """Hashes and writes blocks in a forked child, the blocks in shared memory."""

    def __init__(self, fd: int, block_size: int, blocks: int) -> None:
        # Shared, and only touched (so only resident) when first used.
        self._memory = mmap.mmap(-1, block_size * blocks)
        whole = memoryview(self._memory)
        self._blocks = [
            Block(whole[i * block_size : (i + 1) * block_size], i) for i in range(blocks)
        ]
        self._free = list(reversed(self._blocks))
        self._digests: dict[int, Digest] = {}
        self.error: BaseException | None = None
        self._received = bytearray()
        self._heard: set[int] = set()  # kinds of message received (of those waited for)
        self._closed = False
        commands_in, self._commands = os.pipe()
        try:
            self._messages, messages_out = os.pipe()
        except OSError:
            os.close(commands_in)
            os.close(self._commands)
            raise
        parent = os.getpid()
        try:
            self._pid = os.fork()
        except OSError:  # out of processes or memory: the caller uses threads
            for end in (commands_in, self._commands, self._messages, messages_out):
                os.close(end)
            raise
        if self._pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(self._commands)
                os.close(self._messages)
                _run_child(parent, fd, commands_in, messages_out, whole, block_size)
                code = 0
            except BaseException:
                os.write(messages_out, _MESSAGE.pack(_FAILED, 0))
            finally:
                os._exit(code)
        os.close(commands_in)
        os.close(messages_out)
        self._poll = select.poll()  # not select(): it fails on descriptors over 1023
        self._poll.register(self._messages, select.POLLIN)

    def free_block(self, timeout: float | None) -> Block | None:
        if not self._free:
            self._receive(timeout)
        return self._free.pop() if self._free else None

    def submit(self, block: Block) -> None:
        spans = b"".join(
            _SPAN.pack(start, end, digest.number) for start, end, digest in block.spans
        )
        for start, end, digest in block.spans:
            digest.size += end - start
            self._digests[digest.number] = digest
        self._send(_COMMAND.pack(_BLOCK, block.index, block.length, len(block.spans)) + spans)

    def drain(self) -> None:
        self._send(_COMMAND.pack(_DRAIN, 0, 0, 0))
        self._wait_for(_DRAINED)

    def close(self) -> None:
        try:
            self._send(_COMMAND.pack(_CLOSE, 0, 0, 0))
            self._wait_for(_CLOSED)
        except BaseException:
            self.abort(None)
            raise
        self._reap()

    def _wait_for(self, kind: int) -> None:
        self._heard.discard(kind)
        while kind not in self._heard:
            self._receive(None)

    def abort(self, patience: float | None) -> None:
        """Stop now (no `patience` needed: the child is killed)."""
        if self.error is None:
            self.error = InterruptedError("aborted")
        if not self._closed:
            # The child may be stuck writing to a reader that went away.
            try:
                with contextlib.suppress(ProcessLookupError):  # SIGCHLD ignored: reaped
                    os.kill(self._pid, signal.SIGKILL)
            finally:
                self._reap()

    def _reap(self) -> None:
        try:
            os.close(self._commands)
            os.close(self._messages)
            with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: already reaped
                os.waitpid(self._pid, 0)
        finally:
            self._closed = True

    def _send(self, command: bytes) -> None:
        if self.error is not None:
            raise self.error
        try:
            write_all(self._commands, memoryview(command))
        except BrokenPipeError:
            self._fail(ChildFailed(_STOPPED))
            assert self.error is not None
            raise self.error from None

    def _receive(self, timeout: float | None) -> None:
        """Read and act on what the child said, waiting up to `timeout` seconds for it."""
        if timeout is not None and not self._poll.poll(timeout * 1000):
            return
        data = os.read(self._messages, 4096)
        if not data:
            self._fail(ChildFailed(_STOPPED))
        self._received += data
        while len(self._received) >= _MESSAGE.size:
            kind, value = _MESSAGE.unpack_from(self._received)
            length = _MESSAGE.size + (_DIGEST_SIZE if kind == _DIGEST else 0)
            if len(self._received) < length:
                break
            payload = bytes(self._received[_MESSAGE.size : length])
            del self._received[:length]
            if kind == _FREE:
                self._free.append(self._blocks[value])
            elif kind == _DIGEST:
                self._digests[value].computed(payload)
            elif kind == _FAILED:
                failure = OSError(value, os.strerror(value)) if value else None
                self._fail(failure or ChildFailed("the hashing process failed"))
            else:
                self._heard.add(kind)
        if self.error is not None:
            raise self.error

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


def _run_child(
    parent: int, fd: int, commands: int, messages: int, memory: memoryview, size: int
) -> None:
    """The forked child: hash and write blocks until told to close."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the parent decides, and kills us if need be
    _die_with_parent(parent)
    hashes: dict[int, Any] = {}
    to_write: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    failed = False

    def say(kind: int, value: int, payload: bytes = b"") -> None:
        os.write(messages, _MESSAGE.pack(kind, value) + payload)

    def say_digests(then: int) -> None:
        for number, digest in hashes.items():
            say(_DIGEST, number, digest.digest())
        say(then, 0)

    def write_loop() -> None:
        nonlocal failed
        lower_priority()
        while (item := to_write.get()) is not None:
            index, length = item
            if not failed:
                try:
                    write_all(fd, memory[index * size : index * size + length])
                except BaseException as error:
                    failed = True
                    say(_FAILED, (error.errno or 0) if isinstance(error, OSError) else 0)
            say(_FREE, index)

    writer = threading.Thread(target=write_loop, daemon=True)
    writer.start()
    # Hashing too yields its core to the parent's reading thread: while small
    # files stream, that thread is the slowest part and would otherwise wait
    # for a core a quarter of the time; while large files stream, it is idle.
    lower_priority()
    with os.fdopen(commands, "rb") as stream:
        while command := stream.read(_COMMAND.size):
            if len(command) < _COMMAND.size:
                return  # the parent went away
            kind, index, length, spans = _COMMAND.unpack(command)
            if kind == _BLOCK:
                base = index * size
                for start, end, number in _SPAN.iter_unpack(stream.read(spans * _SPAN.size)):
                    digest = hashes.get(number)
                    if digest is None:
                        digest = hashes[number] = hashlib.sha256()
                    digest.update(memory[base + start : base + end])
                to_write.put((index, length))
            elif kind == _DRAIN:
                say_digests(_DRAINED)
            elif kind == _CLOSE:
                to_write.put(None)
                writer.join()
                if not failed:  # else the parent was told
                    say_digests(_CLOSED)
                return


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this child if its parent dies without killing it (Linux).

    Otherwise a parent killed with SIGKILL would leave it blocked, for ever,
    writing to a reader that stopped reading.
    """
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (ImportError, OSError, AttributeError):
        return  # not Linux: it still ends once its parent's pipe closes
    if os.getppid() != parent:  # the parent died before that took effect
        os._exit(1)
