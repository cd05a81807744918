"""The forked pipeline: hashing and writing threads in a child process.

Python threads share one lock (the GIL): while the filling thread opens and
reads thousands of small files, every hand over of that lock to a hashing
or writing thread costs it a wake-up. In a forked child they have their own
lock and the filling thread runs undisturbed (the benchmark's layer of
21,000 small files streams about a tenth faster). The blocks are in memory
shared with the child; the parent tells it, over a pipe, which block to
hash and write, and the child tells it back which blocks are free again
and, when asked to drain, every digest.

A digest begun with the checkpoints of the same bytes (a rebuild, from the
cache) is hashed a stretch per hashing thread, on as many cores: each
stretch, started from the checkpoint before it, must end exactly at the one
after it, or the digest is `broken`.

Forking follows the rule in __init__.py: no other thread may run.
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
from collections.abc import Iterator
from typing import Any

from ..errors import OperationError
from ..files import write_all
from . import sha256
from .blocks import Block, lower_priority, require_only_thread
from .digest import Chain, Digest
from .sha256 import STATE_SIZE, Sha256

HASHING_THREADS = 2  # a rebuild's digests use two cores

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

    def __init__(self, fd: int, block_size: int, blocks: int, interval: int | None) -> None:
        require_only_thread()
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
                _Child(parent, fd, messages_out, whole, block_size, interval).run(commands_in)
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

    Without expected checkpoints: one chain, on one thread, recording them
    every `interval` bytes (if given). With them: a stretch at a time, each
    on the next hashing thread, each checked against the checkpoint where
    it ends.
    """

    def __init__(self, expected: bytes | None, turns: Iterator[int], interval: int | None) -> None:
        self.expected = expected
        self.broken = False
        self._turns = turns
        self._interval = interval or sha256.CHECKPOINT_INTERVAL
        self._thread = next(turns)
        self._offset = 0  # bytes handed out so far
        self._chain = Chain(interval) if expected is None else None
        self._stretch: Sha256 | None = None  # the stretch being handed out

    def share_out(self, view: memoryview, block: int) -> Iterator[tuple[int, _Work]]:
        """The hashing of `view` (next in this digest), as (thread, work) pairs."""
        if self.expected is None:  # one chain (self._chain), on one thread
            self._offset += len(view)
            yield self._thread, (self, self._chain, view, block, None)
            return
        interval = self._interval
        count = len(self.expected) // STATE_SIZE
        while view:
            stretch, into = divmod(self._offset, interval)
            if into == 0:  # a stretch starts, from the checkpoint before it
                self._thread = next(self._turns)
                if stretch == 0:
                    self._stretch = Sha256()
                elif stretch <= count:
                    state = self.expected[(stretch - 1) * STATE_SIZE : stretch * STATE_SIZE]
                    self._stretch = Sha256(state, self._offset)
                else:  # longer than the bytes the checkpoints were taken of
                    self.broken = True
            part = view[: interval - into]
            ends = into + len(part) == interval and stretch < count
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


class _Child:
    """The forked child: takes the parent's commands until told to close.

    Its steps, as a build meets them: `begin_digest` (a span's digest, with
    the checkpoints expected), `take_block` (its spans' hashing shared out
    among the hashing threads, its write queued), `drain` (wait for every
    task, then report every digest) and `close` (stop the threads, report).
    A block is free again, and the parent told so, when its last task is
    done. The first failure is reported once; after it, no digest is sent,
    so the parent never gets the digest of bytes that were not written.
    """

    def __init__(
        self,
        parent: int,
        fd: int,
        messages: int,
        memory: memoryview,
        block_size: int,
        interval: int | None,
    ) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the parent decides, and kills us if need be
        _die_with_parent(parent)
        self.fd, self.messages = fd, messages
        self.memory, self.block_size, self.interval = memory, block_size, interval
        self.digests: dict[int, _ChildDigest] = {}
        self.to_write: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self.to_hash: list[queue.Queue[_Work | None]] = [
            queue.Queue() for _ in range(HASHING_THREADS)
        ]
        self.turns = itertools.cycle(range(HASHING_THREADS))
        self.tasks_left: dict[int, int] = {}  # per block: hashing and writing before it is free
        self.lock = threading.Lock()
        self.failed = False
        self.hashers = [
            threading.Thread(target=self._hash_loop, args=(work,), daemon=True)
            for work in self.to_hash
        ]
        self.writer = threading.Thread(target=self._write_loop, daemon=True)

    def run(self, commands: int) -> None:
        for thread in (*self.hashers, self.writer):
            thread.start()
        with os.fdopen(commands, "rb") as stream:
            while command := stream.read(_COMMAND.size):
                if len(command) < _COMMAND.size:
                    return  # the parent went away
                kind, first, second, third = _COMMAND.unpack(command)
                if kind == _DIGEST_BEGINS:
                    self.begin_digest(first, stream.read(second * STATE_SIZE))
                elif kind == _BLOCK:
                    self.take_block(first, second, stream.read(third * _SPAN.size))
                elif kind == _DRAIN:
                    self.drain()
                elif kind == _CLOSE:
                    self.close()
                    return

    # -- the steps ------------------------------------------------------------

    def begin_digest(self, number: int, expected: bytes) -> None:
        usable = expected and sha256.resumable()  # else hashed in one chain, as if unknown
        self.digests[number] = _ChildDigest(expected if usable else None, self.turns, self.interval)

    def take_block(self, block: int, length: int, spans: bytes) -> None:
        base = block * self.block_size
        work = [
            shared
            for start, end, number in _SPAN.iter_unpack(spans)
            for shared in self.digests[number].share_out(
                self.memory[base + start : base + end], block
            )
        ]
        with self.lock:
            self.tasks_left[block] = len(work) + 1  # and the write
        for which, item in work:
            self.to_hash[which].put(item)
        self.to_write.put((block, length))

    def drain(self) -> None:
        """Everything so far hashed and written, then the digests."""
        queues: list[queue.Queue[Any]] = [*self.to_hash, self.to_write]
        for work in queues:
            work.join()
        if not self.failed:  # else the parent was told, and gets no digest of lost bytes
            self._say_digests(_DRAINED)

    def close(self) -> None:
        for work in self.to_hash:
            work.put(None)
        for thread in self.hashers:
            thread.join()
        self.to_write.put(None)
        self.writer.join()
        if not self.failed:  # else the parent was told
            self._say_digests(_CLOSED)

    # -- the threads ------------------------------------------------------------

    def _hash_loop(self, work: queue.Queue[_Work | None]) -> None:
        lower_priority()  # see HashingWriter: the parent's reading comes first
        while (item := work.get()) is not None:
            digest, hasher, view, block, check = item
            try:
                if self.failed:  # the output is lost anyway: no digest of it may pass
                    digest.broken = True
                else:
                    hasher.update(view)
                    if check is not None and hasher.state() != check:
                        digest.broken = True
            except BaseException as error:
                digest.broken = True
                self._fail(error)
            finally:
                self._finished(block, work)
        work.task_done()

    def _write_loop(self) -> None:
        lower_priority()
        size = self.block_size
        while (item := self.to_write.get()) is not None:
            block, length = item
            try:
                if not self.failed:
                    write_all(self.fd, self.memory[block * size : block * size + length])
            except BaseException as error:
                self._fail(error)
            finally:
                self._finished(block, self.to_write)
        self.to_write.task_done()

    # -- telling the parent -------------------------------------------------------

    def _say(self, kind: int, value: int, payload: bytes = b"") -> None:
        with self.lock:  # a long message may take several writes: keep it whole
            write_all(self.messages, memoryview(_MESSAGE.pack(kind, value) + payload))

    def _say_digests(self, then: int) -> None:
        for number, digest in self.digests.items():
            self._say(_DIGEST, number, digest.result())
        self._say(then, 0)

    def _fail(self, error: BaseException) -> None:
        code = (error.errno or 0) if isinstance(error, OSError) else 0
        with self.lock:  # once `failed` is seen set, the parent has been told
            if not self.failed:
                with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
                    write_all(self.messages, memoryview(_MESSAGE.pack(_FAILED, code)))
                self.failed = True

    def _finished(self, block: int, work: queue.Queue[Any]) -> None:
        """One task of `block` is done: mark it so, then free the block if it was the last."""
        work.task_done()  # first: a drain must not wait on a message that failed
        with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
            with self.lock:
                self.tasks_left[block] -= 1
                free = not self.tasks_left[block]
            if free:
                self._say(_FREE, block)


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
