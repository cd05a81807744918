"""Where an archive goes: an output file that appears only when complete.

`atomic_output` writes to a temporary file beside the target and renames it
into place on success; on any error, SIGINT, SIGTERM or SIGHUP the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from types import FrameType

from .errors import InputError


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM or SIGHUP arrives."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into Terminated, so `finally` blocks run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[int]:
    """A file descriptor whose contents become `path` only if the block succeeds."""
    if os.path.isdir(path):
        raise InputError(f"output {path} is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output {path}: directory {directory} does not exist")
    try:
        fd, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory
        )
    except OSError as error:
        raise InputError(f"cannot create output {path}: {error.strerror}") from None
    try:
        yield fd
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
