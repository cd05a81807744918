"""The speed machinery, behind one interface: the same bytes as hashlib on one thread,
only faster.

Everything here computes what a plain loop would (the SHA-256 of each span of
a stream, the stream written in order, a function mapped over a list), and
nothing else in the package depends on how:

- `HashingWriter` (writer.py): the stream an archive is written to, a
  `model.TarSink`. It fills pooled blocks (small files are read straight
  into them) while a pipeline hashes and writes full ones on the other
  cores: a forked child (forked.py) where it can, else two threads
  (threaded.py). Its digests (digest.py) are final once it is drained.
  A big copy that no digest covers (an archive's blobs made by the same
  build) goes to a descriptor by the kernel's sendfile.
- SHA-256 resumed from checkpoints (sha256.py): a rebuild checks the digest
  of cached bytes on several cores.
- `forked_map` (forkmap.py): the readers parse layers on two cores.

The rule that makes forking safe: **fork only from a process that runs no
other thread.** A thread that holds a lock (the allocator's, stdio's, a
logging handler's) at the moment of the fork never releases it in the
child, which then deadlocks on first use. So the forked pipeline and
`forked_map` refuse to fork when another thread runs (`require_only_thread`
in blocks.py, which counts the threads the kernel sees, not only those of
the threading module), and the callers start threads only afterwards: a
progress bar's refreshing thread starts after the build's pipeline has
forked (see cli/progress.py), the readers' thread pool is used only when
they do not fork. Under a thread, the threaded pipeline serves instead.

Imports are lazy: `--help` and the readers need none of this.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocks import Sink, can_fork, only_thread, share_heap_arenas
    from .forkmap import forked_map
    from .writer import HashingWriter

__all__ = ["HashingWriter", "Sink", "can_fork", "forked_map", "only_thread", "share_heap_arenas"]

_HOMES = {
    "HashingWriter": "writer",
    "Sink": "blocks",
    "can_fork": "blocks",
    "only_thread": "blocks",
    "share_heap_arenas": "blocks",
    "forked_map": "forkmap",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
