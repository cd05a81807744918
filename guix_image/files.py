"""Opening files that must be regular: never a FIFO to wait on, nor a device to read for ever.

A path named in a config, a cache entry or an archive layout may turn out to
be a FIFO (an open would block until a writer comes) or a device such as
/dev/zero (a read would never end). Each is opened without blocking and
checked before a byte is read.
"""

from __future__ import annotations

import errno
import os
import stat

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegular(OSError):
    """The path is there, but not a regular file."""


def open_regular(path: str | bytes | os.PathLike[str], *, follow: bool = True) -> int:
    """A file descriptor for reading `path`; NotRegular if it is not a regular file.

    OSError as os.open raises it otherwise. `follow=False`: a symlink is an
    error too (ELOOP).
    """
    fd = os.open(path, _FLAGS | (0 if follow else os.O_NOFOLLOW))
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, f"it is {_kind(mode)}, not a regular file")
    return fd


def read_regular(path: str | bytes | os.PathLike[str], limit: int, *, follow: bool = True) -> bytes:
    """The contents of a regular file of at most `limit` bytes (NotRegular, or
    OSError(EFBIG), otherwise)."""
    fd = open_regular(path, follow=follow)
    with os.fdopen(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"over {limit} bytes", os.fsdecode(path))
    return data


def _kind(mode: int) -> str:
    kinds = {
        stat.S_IFIFO: "a FIFO",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFSOCK: "a socket",
        stat.S_IFDIR: "a directory",
    }
    return kinds.get(stat.S_IFMT(mode), "not a file")


def write_all(fd: int, view: memoryview) -> None:
    """All of `view` to `fd` (os.write may take less at a time)."""
    while view:
        written = os.write(fd, view)
        view = view[written:]
