"""NAR, the Nix archive: a store item serialised as Nix and Guix hash it.

    nar       = str("nix-archive-1") node
    node      = str("(") str("type") (regular | symlink | directory) str(")")
    regular   = str("regular") [str("executable") str("")] str("contents") str(contents)
    symlink   = str("symlink") str("target") str(target)
    directory = str("directory")
                { str("entry") str("(") str("name") str(name) str("node") node str(")") }
    str(s)    = its length as a 64-bit little-endian integer, its bytes, and
                zero bytes up to a multiple of 8

A directory's entries are sorted by name, bytewise, and each is serialised
whole before the next: the order of a tar written in sorted tree order (ours,
nixpkgs', `guix pack`'s). `NarHasher` takes an item's entries in that order
and hashes them as they come; any other order is refused (`NotNarOrder`).
A file is executable in a NAR if its owner may execute it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from ..model import SHA256_PREFIX


class NotNarOrder(Exception):
    """Entries that do not come as a NAR serialises them, or that a NAR cannot hold."""


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + bytes(-len(data) % 8)


_OPEN, _CLOSE = _str(b"("), _str(b")")
_TYPE = _str(b"type")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")
_EXECUTABLE = _str(b"executable") + _str(b"")


class NarHasher:
    """The sha256 of one store item's NAR, from its entries in NAR order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(_str(b"nix-archive-1"))
        self._directories: list[bytes] = []  # open ones, outermost first: paths in the item
        self._last_names: list[bytes] = []  # the last entry written in each
        self._started = False

    def directory(self, path: bytes) -> None:
        self._begin(path)
        self._hash.update(_OPEN + _TYPE + _str(b"directory"))
        self._directories.append(path)
        self._last_names.append(b"")

    def symlink(self, path: bytes, target: bytes) -> None:
        self._begin(path)
        self._hash.update(_OPEN + _TYPE + _str(b"symlink") + _str(b"target") + _str(target))
        self._end(path)

    def regular(self, path: bytes, size: int, executable: bool, chunks: Iterable[bytes]) -> None:
        self._begin(path)
        head = _OPEN + _TYPE + _str(b"regular") + (_EXECUTABLE if executable else b"")
        self._hash.update(head + _str(b"contents") + struct.pack("<Q", size))
        written = 0
        for chunk in chunks:
            self._hash.update(chunk)
            written += len(chunk)
        if written != size:
            raise NotNarOrder(f"{path!r}: {written} bytes of contents, not {size}")
        self._hash.update(bytes(-size % 8))
        self._end(path)

    def finish(self) -> str:
        """The NAR hash, "sha256:" and 64 hex digits."""
        if not self._started:
            raise NotNarOrder("no entry for the item itself")
        while self._directories:
            self._close_directory()
        return SHA256_PREFIX + self._hash.hexdigest()

    def _begin(self, path: bytes) -> None:
        """Open the NAR entry for `path` (b"" is the item itself)."""
        if not path:
            if self._started:
                raise NotNarOrder("the item's own entry comes twice")
            self._started = True
            return
        if not self._started:
            raise NotNarOrder(f"{path!r} comes before the item's own entry")
        parent, _, name = path.rpartition(b"/")
        while self._directories and not _within(parent, self._directories[-1]):
            self._close_directory()
        if not self._directories or self._directories[-1] != parent:
            raise NotNarOrder(f"{path!r} comes where its directory is not open")
        if name <= self._last_names[-1]:
            raise NotNarOrder(f"{path!r} comes after {self._last_names[-1]!r}, not sorted")
        self._last_names[-1] = name
        self._hash.update(_ENTRY + _str(name) + _NODE)

    def _end(self, path: bytes) -> None:
        self._hash.update(_CLOSE + (_CLOSE if path else b""))  # the node, then its entry

    def _close_directory(self) -> None:
        path = self._directories.pop()
        self._last_names.pop()
        self._end(path)


def _within(path: bytes, directory: bytes) -> bool:
    return not directory or path == directory or path.startswith(directory + b"/")
