"""The store on disk: checking store paths and scanning them into tar entries.

A store path is read from `root + path`, where `root` is "" for the real
store, or the directory of a chroot store (`nix --store DIR`, or the example
store we generate): the image gets the same absolute paths either way.
Symlinks are never followed, neither in the store path nor below it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from stat import S_ISDIR, S_ISREG
from typing import TYPE_CHECKING, NamedTuple

from ..errors import InputError, OperationError
from ..tar.format import DIRTYPE, REGTYPE, SYMTYPE
from .paths import is_inside

if TYPE_CHECKING:
    from .database import StoreDatabase

STORE_ROOT_MODE = 0o555  # mode of store_dir and its ancestors in the image

_FILE_KINDS = {
    stat.S_IFIFO: "a fifo",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class FileEntry(NamedTuple):
    """One member of a layer tar. `name` has no leading '/'; directories end in '/'."""

    name: bytes
    typeflag: bytes
    mode: int
    size: int
    linkname: bytes
    inode: int = 0  # with ctime, its identity on disk (0: not on disk)
    ctime: int = 0  # nanoseconds


class Store:
    def __init__(self, store_dir: str, root: str | None = None) -> None:
        self.store_dir = store_dir
        self.root = os.fsencode(root.rstrip("/")) if root else b""
        # Member-name prefix of everything in the store: b"gnu/store/".
        self._prefix = os.fsencode(store_dir).strip(b"/") + b"/" if store_dir != "/" else b""

    def check_path(self, path: str, where: str) -> None:
        """Fail with InputError unless `path` exists, not below a symlink."""
        if not is_inside(path, self.store_dir):
            raise InputError(f"{where}: {path} is not inside store_dir {self.store_dir}")
        # Every component between store_dir and the path must be a real
        # directory, or the path would resolve somewhere else.
        parts = path[len(self.store_dir) :].strip("/").split("/")
        for depth in range(1, len(parts)):
            directory = self.store_dir.rstrip("/") + "/" + "/".join(parts[:depth])
            self._require_directory(directory, path, where)
        try:
            os.lstat(self.root + os.fsencode(path))
        except FileNotFoundError:
            raise InputError(f"{where}: store path {path} does not exist{self._where()}") from None
        except OSError as error:
            raise InputError(f"{where}: cannot read store path {path}: {error.strerror}") from None

    def _require_directory(self, directory: str, path: str, where: str) -> None:
        try:
            mode = os.lstat(self.root + os.fsencode(directory)).st_mode
        except OSError:
            raise InputError(f"{where}: store path {path} does not exist{self._where()}") from None
        if not stat.S_ISDIR(mode):
            raise InputError(
                f"{where}: store path {path} lies below {directory}, which is not a directory"
            )

    def _where(self) -> str:
        return f" (under root {os.fsdecode(self.root)})" if self.root else ""

    def identity(self, path: str, database: StoreDatabase | None) -> str:
        """What identifies a store path's contents without reading them.

        The NAR hash the store database registered, else the path's inode and
        times: replacing a store path (the only way a store changes) changes them.
        """
        nar_hash = database.nar_hash(path) if database is not None else None
        if nar_hash is not None:
            return f"nar:{nar_hash}"
        try:
            st = os.lstat(self.root + os.fsencode(path))
        except OSError:
            return "missing"
        fields = (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return "stat:" + ":".join(map(str, fields))

    def store_dir_entries(self) -> list[FileEntry]:
        """Directory entries for every ancestor of store_dir and store_dir itself."""
        entries = []
        name = b""
        for part in os.fsencode(self.store_dir).strip(b"/").split(b"/"):
            if part:
                name += part + b"/"
                entries.append(FileEntry(name, DIRTYPE, STORE_ROOT_MODE, 0, b""))
        return entries

    def iter_layer(self, paths: Sequence[str], where: str) -> Iterator[FileEntry]:
        """The tar entries of a layer made of `paths`, in tree order, sorted bytewise.

        Duplicate paths and paths inside another listed path are included once.
        """
        entries = self.store_dir_entries()
        yield from entries
        emitted_dirs = {entry.name for entry in entries}
        last = b"\0"  # in tree order, a path inside another comes right after it
        for path in _sorted_paths(paths):
            if path.startswith(last + b"/"):
                continue
            last = path
            name = path.lstrip(b"/")
            for parent in _intermediate_dirs(name, self._prefix):
                if parent not in emitted_dirs:
                    emitted_dirs.add(parent)
                    yield self._directory_entry(parent.rstrip(b"/"), where)
            yield from self._walk(name, where)

    def _directory_entry(self, name: bytes, where: str) -> FileEntry:
        disk = self.root + b"/" + name
        try:
            entry = _make_entry(name, os.lstat(disk), disk, where)
        except OSError as error:
            raise _read_error(disk, error, where) from None
        if entry.typeflag != DIRTYPE:
            raise InputError(f"{where}: {os.fsdecode(disk)} is not a directory")
        return entry

    def _walk(self, top: bytes, where: str) -> Iterator[FileEntry]:
        root = self.root + b"/"
        lstat, listdir = os.lstat, os.listdir
        stack = [top]
        pop, extend = stack.pop, stack.extend
        while stack:
            name = pop()
            disk = root + name
            try:
                st = lstat(disk)
                mode = st.st_mode
                if S_ISREG(mode):
                    yield FileEntry(
                        name, REGTYPE, mode & 0o7777, st.st_size, b"", st.st_ino, st.st_ctime_ns
                    )
                    continue
                if S_ISDIR(mode):
                    children = listdir(disk)
                    yield FileEntry(
                        name + b"/", DIRTYPE, mode & 0o7777, 0, b"", st.st_ino, st.st_ctime_ns
                    )
                    if children:
                        children.sort(reverse=True)
                        prefix = name + b"/"
                        extend([prefix + child for child in children])
                    continue
                entry = _make_entry(name, st, disk, where)  # symlinks, or refused kinds
            except OSError as error:
                raise _read_error(disk, error, where) from None
            yield entry


def _make_entry(name: bytes, st: os.stat_result, disk: bytes, where: str) -> FileEntry:
    mode = st.st_mode
    kind = stat.S_IFMT(mode)
    identity = (st.st_ino, st.st_ctime_ns)
    if kind == stat.S_IFREG:
        return FileEntry(name, REGTYPE, mode & 0o7777, st.st_size, b"", *identity)
    if kind == stat.S_IFDIR:
        return FileEntry(name + b"/", DIRTYPE, mode & 0o7777, 0, b"", *identity)
    if kind == stat.S_IFLNK:
        return FileEntry(name, SYMTYPE, 0o777, 0, os.readlink(disk), *identity)
    raise InputError(
        f"{where}: {os.fsdecode(disk)} is {_FILE_KINDS.get(kind, 'an unsupported file')}; "
        "an image layer holds only files, directories and symlinks"
    )


def _read_error(disk: bytes, error: OSError, where: str) -> OperationError:
    return OperationError(f"{where}: cannot read {os.fsdecode(disk)}: {error.strerror}")


def _sorted_paths(paths: Iterable[str]) -> list[bytes]:
    # Sorting by components keeps tree order: "a", "a/b", then "a-c".
    return sorted({os.fsencode(p) for p in paths}, key=lambda p: p.split(b"/"))


def _intermediate_dirs(name: bytes, store_prefix: bytes) -> list[bytes]:
    """Directory names between the store dir and `name` (exclusive), top down."""
    dirs = []
    current = store_prefix
    for part in name[len(store_prefix) :].split(b"/")[:-1]:
        current += part + b"/"
        dirs.append(current)
    return dirs
