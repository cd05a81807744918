"""Layers to build: what each contains, how big its tar is, and how to stream it.

A layer's tar size is known before a byte of it is written (headers plus
padded contents, from the scan), so the archive can put the layer's header
first and stream its contents once, hashing on the way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InputError, OperationError
from .hashing_writer import HashingWriter
from .store import FileEntry, Store
from .tarwriter import END_OF_ARCHIVE, REGTYPE, HeaderEncoder, padded, padding

# Called with the number of bytes of the layer written so far.
ProgressCallback = Callable[[int], None]
_PROGRESS_EVERY = 256  # entries between progress callbacks

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class Layer:
    """A layer of the image being built."""

    description: str  # one line for progress output
    comment: str  # history comment
    expected_diff_id: str | None = None  # known in advance, checked after streaming

    def prepare(self) -> int:
        """Do what is needed to know the layer's tar size, and return it."""
        raise NotImplementedError

    def write_to(self, writer: HashingWriter, progress: ProgressCallback) -> None:
        raise NotImplementedError


class StoreLayer(Layer):
    """A tar of store paths, made from the files on disk."""

    def __init__(self, store: Store, paths: Sequence[str], encoder: HeaderEncoder, where: str):
        self.store = store
        self.paths = tuple(paths)
        self.encoder = encoder
        self.where = where
        self.description = f"from paths: {json.dumps(list(self.paths))}"
        self.comment = f"store paths: {json.dumps(list(self.paths))}"
        self.entries: list[FileEntry] = []

    def prepare(self) -> int:
        self.entries = self.store.scan_layer(self.paths, self.where)
        header_size = self.encoder.header_size
        return sum(
            header_size(e.name, e.linkname, e.size) + padded(e.size) for e in self.entries
        ) + len(END_OF_ARCHIVE)

    def write_to(self, writer: HashingWriter, progress: ProgressCallback) -> None:
        encode = self.encoder.encode
        disk_path = self.store.disk_path
        start = writer.position
        for count, (name, typeflag, mode, size, linkname) in enumerate(self.entries, 1):
            writer.write(encode(name, typeflag, mode, size, linkname))
            if typeflag == REGTYPE and size:
                self._copy_file(writer, disk_path(name), size)
                writer.write_zeros(padding(size))
            if count % _PROGRESS_EVERY == 0:
                progress(writer.position - start)
        writer.write(END_OF_ARCHIVE)
        progress(writer.position - start)
        self.entries = []  # the scan is only needed once; free it

    def _copy_file(self, writer: HashingWriter, path: bytes, size: int) -> None:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as error:
            raise OperationError(
                f"{self.where}: cannot read {os.fsdecode(path)}: {error.strerror}"
            ) from None
        try:
            writer.copy_from_fd(fd, size, os.fsdecode(path))
        except OSError as error:
            raise OperationError(
                f"{self.where}: cannot read {os.fsdecode(path)}: {error.strerror}"
            ) from None
        finally:
            os.close(fd)


@dataclass
class BlobLayer(Layer):
    """An existing layer tar: a file, or a byte range of an archive (a base image layer)."""

    path: str
    offset: int
    size: int
    description: str
    comment: str
    expected_diff_id: str | None = None

    def prepare(self) -> int:
        return self.size

    def write_to(self, writer: HashingWriter, progress: ProgressCallback) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise InputError(f"cannot read {self.path}: {error.strerror}") from None
        try:
            os.lseek(fd, self.offset, os.SEEK_SET)
            writer.copy_from_fd(fd, self.size, self.path, at_eof=False)
        finally:
            os.close(fd)
        progress(self.size)
