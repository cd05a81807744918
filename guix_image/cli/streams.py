"""Standard streams that were closed when the program started (`>&-`, `2>&-`, `<&-`).

A closed descriptor is taken by the next file opened: with stderr closed,
an error message would be written into the archive being built. So each
closed one is held open on /dev/null before anything else is opened, and
the Python stream for it is replaced: stdout by one that fails on every
write (its output would be lost), stderr by /dev/null (diagnostics go
nowhere, the exit status still tells), stdin by /dev/null (empty).
"""

from __future__ import annotations

import errno
import io
import os
import sys

CLOSED: set[int] = set()  # which of 0, 1, 2 were closed


class ClosedOutput(io.TextIOBase):
    """Standard output that was closed: writing to it is an error, never a silent loss."""

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "standard output is closed")

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")

    @property
    def buffer(self) -> ClosedOutput:
        return self


def guard() -> None:
    """Hold every closed standard descriptor open on /dev/null (see above)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            CLOSED.add(fd)
    if 0 in CLOSED:
        sys.stdin = open(os.devnull)  # noqa: SIM115 - for the process's lifetime
    if 1 in CLOSED:
        sys.stdout = ClosedOutput()
    if 2 in CLOSED:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
