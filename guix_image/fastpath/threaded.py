"""A pipeline of two threads in this process: one hashes full blocks, one writes them.

Used where the forked pipeline cannot be (see forked.py): no `fork`, a sink
that is a function, or another thread already running.
"""

from __future__ import annotations

import queue
import threading

from ..files import write_all
from .blocks import Block, Sink, lower_priority


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
        """Until every block submitted is hashed and written."""
        self._to_hash.join()
        self._to_write.join()

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
                self._to_write.task_done()
