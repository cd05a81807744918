"""Where an archive goes: an output file that appears only when complete.

`atomic_output` writes to a temporary file beside the target and renames it
into place on success; on any error, SIGINT, SIGTERM or SIGHUP the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
from collections.abc import Iterator
from types import FrameType

from ..errors import InputError


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
    """A file descriptor whose contents become `path` only if the block succeeds.

    An existing device or FIFO (/dev/null, /dev/stdout, a named pipe) cannot
    be replaced: it is written directly.
    """
    if os.path.isdir(path):
        raise InputError(f"output {path} is a directory")
    if os.path.exists(path) and not os.path.isfile(path):
        with _open_special(path) as fd:
            enlarge_pipe(fd)
            yield fd
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output {path}: directory {directory} does not exist")
    try:
        import tempfile  # here: a build to a pipe skips the import

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


@contextlib.contextmanager
def _open_special(path: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as error:
        raise InputError(f"cannot open output {path}: {error.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def enlarge_pipe(fd: int) -> None:
    """Give a pipe a 1 MiB buffer (Linux): fewer wake-ups for writer and reader."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (OSError, AttributeError):
        pass  # not Linux, or over the system's limit: the default works too
