"""What the pipelines share: pooled blocks, where they go, and the rule for forking."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .digest import Digest

# Where the stream goes: a file descriptor, or a function that takes each block.
Sink = int | Callable[[memoryview], Any]
Span = tuple[int, int, "Digest"]  # start and end in the block, and whose span


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


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def share_heap_arenas(count: int = 2) -> None:
    """Let threads started from now on share `count` of the C allocator's arenas.

    glibc gives each thread that allocates its own arena, up to 8 per core,
    and an arena keeps what is freed into it: with compressing workers
    allocating and other threads freeing big buffers, a build's peak rose by
    10 MiB or more (measured). It is for the whole process and for good, and
    only the allocator's bookkeeping changes; a C library other than glibc
    is left as it is.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, count)
    except (OSError, AttributeError):
        pass  # not glibc: only more memory


def only_thread() -> bool:
    """Whether this process runs one thread: the condition for forking (see __init__.py)."""
    try:  # also sees threads started without the threading module
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


def can_fork() -> bool:
    return hasattr(os, "fork") and only_thread()


def require_only_thread() -> None:
    """Refuse to fork from a process that runs other threads (see __init__.py)."""
    if not only_thread():
        raise RuntimeError("refusing to fork: another thread runs, and its locks would be lost")
