"""A NAR serialiser written from the Nix archive format's definition, reading a
tree on disk: the reference the tests check `guix_image.store.nar` against (and
that `nix-store --dump` checks, where Nix is installed).

    serialise(path) = str("nix-archive-1") + node(path)
    node(path)      = str("(") + str("type") + ... + str(")")
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * ((8 - len(data) % 8) % 8)


def _node(path: bytes) -> bytes:
    info = os.lstat(path)
    out = _str(b"(") + _str(b"type")
    if stat.S_ISLNK(info.st_mode):
        out += _str(b"symlink") + _str(b"target") + _str(os.readlink(path))
    elif stat.S_ISREG(info.st_mode):
        out += _str(b"regular")
        if info.st_mode & stat.S_IXUSR:
            out += _str(b"executable") + _str(b"")
        with open(path, "rb") as file:
            out += _str(b"contents") + _str(file.read())
    elif stat.S_ISDIR(info.st_mode):
        out += _str(b"directory")
        for name in sorted(os.listdir(path)):
            out += _str(b"entry") + _str(b"(") + _str(b"name") + _str(name)
            out += _str(b"node") + _node(os.path.join(path, name)) + _str(b")")
    else:
        raise ValueError(f"{path!r}: not in a NAR")
    return out + _str(b")")


def nar_hash(path: Path) -> str:
    """ "sha256:" and the hex digest of the NAR of `path`, as store databases record it."""
    nar = _str(b"nix-archive-1") + _node(os.fsencode(path))
    return "sha256:" + hashlib.sha256(nar).hexdigest()
