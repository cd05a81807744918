"""Where HashingWriter's full blocks go: hashed, written in order, then reused.

A pipeline owns a pool of blocks. The writer's thread takes a free block,
fills it, and submits it with its spans (the parts of it that belong to a
digest); the pipeline hashes the spans, writes the block, and frees it.
What is hashed is what is written: both read the same private copy of the
bytes, which is not reused before both are done with it.

Two pipelines do this:
- ThreadedPipeline: a hashing thread and a writing thread in this process.
- ForkedPipeline: hashing threads and a writing thread in a forked child,
  the blocks in memory shared with it. Python threads share one lock (the
  GIL): while the filling thread opens and reads thousands of small files,
  every hand over of that lock to the hashing or writing thread costs it a
  wake-up. In a child process they have their own lock and the filling
  thread runs undisturbed (the benchmark's layer of 21,000 small files
  streams about a tenth faster). It needs `fork`, a file descriptor to
  write to, and no other thread running when it starts.

A digest records checkpoints as it goes (see sha256.py). A digest begun
with the checkpoints of the same bytes, from the cache, is hashed by the
forked pipeline a stretch per hashing thread, on as many cores; if its
bytes do not reach a checkpoint, the digest is `broken` (not the cached
layer's). The threaded pipeline hashes it in one chain and compares the
checkpoints it records with those expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import queue
import select
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import sha256
from .errors import OperationError
from .sha256 import STATE_SIZE, Sha256

Sink = int | Callable[[memoryview], Any]
HASHING_THREADS = 2  # of the forked pipeline: a rebuild's digests use two cores


class Chain:
    """One SHA-256 fed in order, taking a checkpoint every interval if it can (sha256.py)."""

    def __init__(self) -> None:
        self._hash: Any = Sha256() if sha256.resumable() else hashlib.sha256()
        self._recording = isinstance(self._hash, Sha256)
        self.length = 0
        self._checkpoints = bytearray()

    def update(self, view: memoryview) -> None:
        if not self._recording:
            self._hash.update(view)
            self.length += len(view)
            return
        while view:
            part = view[: sha256.CHECKPOINT_INTERVAL - self.length % sha256.CHECKPOINT_INTERVAL]
            self._hash.update(part)
            self.length += len(part)
            view = view[len(part) :]
            if self.length % sha256.CHECKPOINT_INTERVAL == 0:
                self._checkpoints += self._hash.state()

    def digest(self) -> bytes:
        return bytes(self._hash.digest())

    def checkpoints(self) -> bytes:
        """The checkpoints before the end (none if they could not be taken)."""
        return bytes(self._checkpoints[: sha256.checkpoint_count(self.length) * STATE_SIZE])


class Digest:
    """The SHA-256 of one span of the stream, complete once the writer is drained.

    `expected` holds the checkpoints of the same bytes, if known (a
    rebuild): the forked pipeline then hashes their stretches in parallel.
    """

    def __init__(self, number: int = 0, expected: bytes = b"") -> None:
        self.number = number  # its place among the writer's digests
        self.size = 0
        self.expected = expected
        self._chain: Chain | None = None  # when hashed in this process
        self._computed: tuple[bytes, bytes, bool] | None = None  # digest, checkpoints, broken

    def update(self, data: memoryview) -> None:
        if self._chain is None:
            self._chain = Chain()
        self._chain.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        if self._computed is not None:
            return self._computed[0].hex()
        if self._chain is None:  # nothing was hashed
            return hashlib.sha256().hexdigest()
        return self._chain.digest().hex()

    @property
    def checkpoints(self) -> bytes:
        """Those recorded while hashing (none when `expected` ones were checked in parallel)."""
        if self._computed is not None:
            return self._computed[1]
        return self._chain.checkpoints() if self._chain is not None else b""

    @property
    def broken(self) -> bool:
        """Whether the bytes missed an expected checkpoint: they are not the cached layer's."""
        if self._computed is not None:
            return self._computed[2]
        return bool(self.expected and self.checkpoints and self.checkpoints != self.expected)

    def computed(self, digest: bytes, checkpoints: bytes, broken: bool) -> None:
        """Take what another process computed for the same bytes."""
        self._computed = (digest, checkpoints, broken)


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
# Parent to child: a command; a block's is followed by its spans (start, end,
# digest number), a new digest's by the checkpoints expected, if any.
_COMMAND = struct.Struct("<IIII")  # kind, and for a block: index, length, span count
_SPAN = struct.Struct("<III")
_BLOCK, _DRAIN, _CLOSE, _DIGEST_BEGINS = 1, 2, 3, 4  # _DIGEST_BEGINS: number, checkpoints
# Child to parent: a message; a _DIGEST (value: its number) is followed by
# the digest, whether it is broken, and the checkpoints recorded.
_MESSAGE = struct.Struct("<II")  # kind, value
_DIGEST_HEAD = struct.Struct("<32sII")  # digest, broken, length of the checkpoints
_FREE, _DIGEST, _DRAINED, _FAILED, _CLOSED = 1, 2, 3, 4, 5
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
        begins = b""
        for start, end, digest in block.spans:
            digest.size += end - start
            if digest.number not in self._digests:
                self._digests[digest.number] = digest
                count = len(digest.expected) // STATE_SIZE
                begins += _COMMAND.pack(_DIGEST_BEGINS, digest.number, count, 0)
                begins += digest.expected[: count * STATE_SIZE]
        spans = b"".join(
            _SPAN.pack(start, end, digest.number) for start, end, digest in block.spans
        )
        command = _COMMAND.pack(_BLOCK, block.index, block.length, len(block.spans))
        self._send(begins + command + spans)

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
            length = _MESSAGE.size
            if kind == _DIGEST:
                length += _DIGEST_HEAD.size
                if len(self._received) >= length:
                    length += _DIGEST_HEAD.unpack_from(self._received, _MESSAGE.size)[2]
            if len(self._received) < length:
                break
            payload = bytes(self._received[_MESSAGE.size : length])
            del self._received[:length]
            if kind == _FREE:
                self._free.append(self._blocks[value])
            elif kind == _DIGEST:
                digest, broken, _ = _DIGEST_HEAD.unpack_from(payload)
                checkpoints = payload[_DIGEST_HEAD.size :]
                self._digests[value].computed(digest, checkpoints, bool(broken))
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


# Work for a hashing thread: the chain or stretch to feed, the bytes, their
# block, and the checkpoint the stretch must then be at (None: no check).
_Work = tuple["_ChildDigest", Any, memoryview, int, bytes | None]


class _ChildDigest:
    """A digest as the child hashes it.

    Without expected checkpoints: one chain, on one thread, recording them.
    With them: a stretch at a time, each on the next hashing thread, each
    checked against the checkpoint where it ends.
    """

    def __init__(self, expected: bytes | None, turns: Iterator[int]) -> None:
        self.expected = expected
        self.broken = False
        self._turns = turns
        self._thread = next(turns)
        self._offset = 0  # bytes handed out so far
        self._chain = Chain() if expected is None else None
        self._stretch: Sha256 | None = None  # the stretch being handed out

    def share_out(self, view: memoryview, block: int) -> Iterator[tuple[int, _Work]]:
        """The hashing of `view` (next in this digest), as (thread, work) pairs."""
        if self.expected is None:  # one chain (self._chain), on one thread
            self._offset += len(view)
            yield self._thread, (self, self._chain, view, block, None)
            return
        count = len(self.expected) // STATE_SIZE
        while view:
            stretch, into = divmod(self._offset, sha256.CHECKPOINT_INTERVAL)
            if into == 0:  # a stretch starts, from the checkpoint before it
                self._thread = next(self._turns)
                if stretch == 0:
                    self._stretch = Sha256()
                elif stretch <= count:
                    state = self.expected[(stretch - 1) * STATE_SIZE : stretch * STATE_SIZE]
                    self._stretch = Sha256(state, self._offset)
                else:  # longer than the bytes the checkpoints were taken of
                    self.broken = True
            part = view[: sha256.CHECKPOINT_INTERVAL - into]
            ends = into + len(part) == sha256.CHECKPOINT_INTERVAL and stretch < count
            check = (
                self.expected[stretch * STATE_SIZE : (stretch + 1) * STATE_SIZE] if ends else None
            )
            if not self.broken:
                yield self._thread, (self, self._stretch, part, block, check)
            self._offset += len(part)
            view = view[len(part) :]

    def result(self) -> bytes:
        """The digest, whether it is broken, and the checkpoints recorded: a _DIGEST's payload."""
        if self._chain is not None:
            digest, checkpoints = self._chain.digest(), self._chain.checkpoints()
        else:
            digest = self._stretch.digest() if self._stretch else hashlib.sha256().digest()
            checkpoints = b""
        return _DIGEST_HEAD.pack(digest, self.broken, len(checkpoints)) + checkpoints


def _run_child(
    parent: int, fd: int, commands: int, messages: int, memory: memoryview, size: int
) -> None:
    """The forked child: hash and write blocks until told to close."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the parent decides, and kills us if need be
    _die_with_parent(parent)
    digests: dict[int, _ChildDigest] = {}
    to_write: queue.Queue[tuple[int, int] | None] = queue.Queue()
    to_hash: list[queue.Queue[_Work | None]] = [queue.Queue() for _ in range(HASHING_THREADS)]
    all_work: list[queue.Queue[Any]] = [*to_hash, to_write]
    turns = itertools.cycle(range(HASHING_THREADS))
    tasks_left: dict[int, int] = {}  # per block: hashing and writing before it is free
    lock = threading.Lock()
    failed = False

    def say(kind: int, value: int, payload: bytes = b"") -> None:
        with lock:  # a long message may take several writes: keep it whole
            write_all(messages, memoryview(_MESSAGE.pack(kind, value) + payload))

    def fail(error: BaseException) -> None:
        nonlocal failed
        code = (error.errno or 0) if isinstance(error, OSError) else 0
        with lock:  # once `failed` is seen set, the parent has been told
            if not failed:
                with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
                    write_all(messages, memoryview(_MESSAGE.pack(_FAILED, code)))
                failed = True

    def task_done(block: int) -> None:
        with lock:
            tasks_left[block] -= 1
            free = not tasks_left[block]
        if free:
            say(_FREE, block)

    def finished(block: int, work: queue.Queue[Any]) -> None:
        """One task of `block` is done: mark it so, then free the block if it was the last."""
        work.task_done()  # first: a drain must not wait on a message that failed
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            task_done(block)

    def say_digests(then: int) -> None:
        for number, digest in digests.items():
            say(_DIGEST, number, digest.result())
        say(then, 0)

    def hash_loop(work: queue.Queue[_Work | None]) -> None:
        lower_priority()  # see HashingWriter: the parent's reading comes first
        while (item := work.get()) is not None:
            digest, hasher, view, block, check = item
            try:
                if failed:  # the output is lost anyway: no digest of it may pass
                    digest.broken = True
                else:
                    hasher.update(view)
                    if check is not None and hasher.state() != check:
                        digest.broken = True
            except BaseException as error:
                digest.broken = True
                fail(error)
            finally:
                finished(block, work)
        work.task_done()

    def write_loop() -> None:
        lower_priority()
        while (item := to_write.get()) is not None:
            block, length = item
            try:
                if not failed:
                    write_all(fd, memory[block * size : block * size + length])
            except BaseException as error:
                fail(error)
            finally:
                finished(block, to_write)
        to_write.task_done()

    hashers = [threading.Thread(target=hash_loop, args=(q,), daemon=True) for q in to_hash]
    writer = threading.Thread(target=write_loop, daemon=True)
    for thread in (*hashers, writer):
        thread.start()
    with os.fdopen(commands, "rb") as stream:
        while command := stream.read(_COMMAND.size):
            if len(command) < _COMMAND.size:
                return  # the parent went away
            kind, first, second, third = _COMMAND.unpack(command)
            if kind == _DIGEST_BEGINS:
                expected = stream.read(second * STATE_SIZE)
                usable = second and sha256.resumable()  # else hashed in one chain, as if unknown
                digests[first] = _ChildDigest(expected if usable else None, turns)
            elif kind == _BLOCK:
                block, length, spans = first, second, third
                base = block * size
                work = [
                    shared
                    for start, end, number in _SPAN.iter_unpack(stream.read(spans * _SPAN.size))
                    for shared in digests[number].share_out(
                        memory[base + start : base + end], block
                    )
                ]
                with lock:
                    tasks_left[block] = len(work) + 1  # and the write
                for which, item in work:
                    to_hash[which].put(item)
                to_write.put((block, length))
            elif kind == _DRAIN:  # everything so far hashed and written
                for work_queue in all_work:
                    work_queue.join()
                if not failed:  # else the parent was told, and gets no digest of lost bytes
                    say_digests(_DRAINED)
            elif kind == _CLOSE:
                for work_queue in to_hash:
                    work_queue.put(None)
                for thread in hashers:
                    thread.join()
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
