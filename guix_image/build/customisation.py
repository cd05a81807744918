"""The customisation layer `build STORE_ITEM...` makes: links into the store and
files from the host, as the reference script's prebuilt `customisation_layer`
(a directory holding `layer.tar` and its sha256 `checksum`).

- `--symlink LINK=TARGET`, as `guix pack -S /bin=bin`: LINK in the image,
  pointing to TARGET inside the first store item;
- `--add SRC:DEST`: a host file or directory, copied to DEST, symlinks as
  symlinks, its metadata normalised as store layers' (the build's mtime and
  owner, the permission bits from the disk).

The layer is written in bytewise-sorted order with every parent directory
declared: the same options and files give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from ..tar.format import DIRTYPE, REGTYPE, SYMTYPE, padding
from ..tar.writer import HeaderEncoder
from .output import atomic_output, write_atomically

END = bytes(1024)  # two zero blocks


@dataclass(frozen=True)
class _Entry:
    typeflag: bytes
    mode: int
    source: bytes | None = None  # a host file's path, for its contents
    size: int = 0
    linkname: bytes = b""


def write_customisation(
    directory: str, symlinks: list[str], adds: list[str], first_item: str, mtime: int
) -> None:
    """Write DIRECTORY/layer.tar and DIRECTORY/checksum."""
    entries: dict[bytes, _Entry] = {}
    for value in symlinks:
        link, equals, target = value.partition("=")
        if not equals or not link.strip("/") or not target:
            raise InputError(f"--symlink {value!r}: give LINK=TARGET, as /bin=bin")
        name = _image_name(link, "--symlink")
        _parents(entries, name)
        entries[name] = _Entry(SYMTYPE, 0o777, linkname=os.fsencode(_join(first_item, target)))
    for value in adds:
        source, colon, destination = value.rpartition(":")
        if not colon or not source or not destination.startswith("/"):
            raise InputError(f"--add {value!r}: give SRC:DEST, DEST absolute in the image")
        name = _image_name(destination, "--add")
        _parents(entries, name)
        _add_tree(entries, os.fsencode(source), name, value)
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256()
    encoder = HeaderEncoder(mtime=mtime)
    layer = os.path.join(directory, "layer.tar")
    with atomic_output(layer) as fd, open(fd, "wb", closefd=False) as out:

        def write(data: bytes) -> None:
            digest.update(data)
            out.write(data)

        for name in sorted(entries):
            entry = entries[name]
            member = name + b"/" if entry.typeflag == DIRTYPE else name
            write(encoder.encode(member, entry.typeflag, entry.mode, entry.size, entry.linkname))
            if entry.source is not None:
                _copy(entry, write)
        write(END)
    write_atomically(os.path.join(directory, "checksum"), digest.hexdigest() + "\n")


def _image_name(path: str, option: str) -> bytes:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise InputError(f"{option} {path!r}: a path inside the image, without '..'")
    return os.fsencode("/".join(parts))


def _join(item: str, target: str) -> str:
    parts = [part for part in target.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InputError(f"--symlink target {target!r}: a path inside the store item")
    return "/".join([item.rstrip("/"), *parts]) if parts else item


def _parents(entries: dict[bytes, _Entry], name: bytes) -> None:
    parts = name.split(b"/")[:-1]
    for depth in range(1, len(parts) + 1):
        entries.setdefault(b"/".join(parts[:depth]), _Entry(DIRTYPE, 0o755))


def _add_tree(entries: dict[bytes, _Entry], source: bytes, name: bytes, option: str) -> None:
    stack = [(source, name)]
    while stack:
        path, member = stack.pop()
        try:
            info = os.lstat(path)
        except OSError as error:
            raise InputError(f"--add {option!r}: {os.fsdecode(path)}: {error.strerror}") from None
        mode = stat.S_IMODE(info.st_mode) & 0o7777
        if stat.S_ISDIR(info.st_mode):
            entries[member] = _Entry(DIRTYPE, mode)
            for child in sorted(os.listdir(path)):
                stack.append((os.path.join(path, child), member + b"/" + child))
        elif stat.S_ISLNK(info.st_mode):
            entries[member] = _Entry(SYMTYPE, 0o777, linkname=os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            entries[member] = _Entry(REGTYPE, mode, source=path, size=info.st_size)
        else:
            raise InputError(f"--add {option!r}: {os.fsdecode(path)} is not a file or directory")


def _copy(entry: _Entry, write: Callable[[bytes], None]) -> None:
    assert entry.source is not None
    copied = 0
    with open(entry.source, "rb") as file:
        while chunk := file.read(1 << 20):
            copied += len(chunk)
            if copied > entry.size:
                break
            write(chunk)
    if copied != entry.size:
        raise InputError(f"--add: {os.fsdecode(entry.source)} changed while it was copied")
    write(bytes(padding(entry.size)))
