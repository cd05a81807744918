"""Where an archive goes: an output file that appears only when complete.

`atomic_output` writes to a temporary file beside the target and renames it
into place on success; on any error, SIGINT, SIGTERM or SIGHUP the temporary
file is removed and the target is left as it was. A build killed outright
(SIGKILL, a crash) cannot remove it: each temporary file is locked (flock)
by the build writing it, so the next build to the same place removes those
whose lock it can take, proof that their writer is gone.
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


def write_atomically(path: str, text: str) -> None:
    """`text` as the file `path`, whole or not at all (see atomic_output)."""
    with atomic_output(path) as fd, open(fd, "w", encoding="utf-8", closefd=False) as out:
        out.write(text)


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
    prefix = f".{os.path.basename(path)}."
    remove_dead_parts(directory, prefix)
    try:
        fd, temporary = _locked_temporary(directory, prefix)
    except OSError as error:
        raise InputError(f"cannot create output {path}: {error.strerror}") from None
    try:
        yield fd
        os.fchmod(fd, 0o666 & ~current_umask())
        os.replace(temporary, path)  # while still locked: no cleaner takes it
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    finally:
        os.close(fd)


def _locked_temporary(directory: str, prefix: str) -> tuple[int, str]:
    """A new `prefix*.part` file, locked before it bears that name (see above)."""
    import tempfile  # here: a build to a pipe skips the import

    fd, new = tempfile.mkstemp(prefix=prefix, suffix=".new", dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        temporary = new.removesuffix(".new") + ".part"
        os.rename(new, temporary)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(new)
        raise
    return fd, temporary


def remove_dead_parts(directory: str, prefix: str) -> list[str]:
    """Remove the `prefix*.part` files in `directory` whose writer is gone; their names.

    Housekeeping, never a reason to fail.
    """
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".part")]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: nobody writes it
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass  # locked (alive), or gone meanwhile
        finally:
            os.close(fd)
    return removed


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
