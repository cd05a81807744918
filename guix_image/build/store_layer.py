"""A layer of store paths: what it contains, how big its tar is, and how to stream it.

A layer's tar size is known before a byte of it is written, so the archive
can put the layer's header first and stream its contents once, hashing on
the way. The size comes from a scan of the store paths (headers plus padded
contents), or, for a layer in the cache, from the cache: then the layer is
streamed from its cached member list, or else walked while it streams, and
the result is checked against the prediction.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import FileChanged, OperationError, SourceError
from ..model import Layer, Measured, Progress, TarSink
from ..store.database import StoreDatabase
from ..store.walk import Store
from ..tar.format import END_OF_ARCHIVE, padded
from ..tar.writer import HeaderEncoder
from .cache import LAYER_FORMAT, CachedLayer, LayerCache, blob_entries, cache_key
from .member_list import Chunk, Member, MemberList, MemberListError, MemberListGone

_PROGRESS_EVERY = 256  # entries between progress callbacks
# Encoded headers kept per layer (about 0.7 kB each). A bigger layer is sized
# by a scan that keeps nothing, then walked again while it streams.
MAX_PLANNED = 24_000
_CHECKS_PER_STEP = 512  # member list entries checked per idle step
# Errors opening a listed file that mean the store is not as listed.
_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO}


class StaleCacheEntry(OperationError):
    """A cached prediction of a layer turned out wrong: the store changed."""


@functools.cache
def list_tag() -> bytes:
    """What a member list must have been written by to be replayed.

    Lists hold encoded headers and the walk's order: only the same code may
    replay them, even where a change forgot to bump LAYER_FORMAT (a checkout,
    an editable install), so the tag hashes that code's source.
    """
    from ..store import walk
    from ..tar import format, writer
    from . import member_list

    code = hashlib.sha256()
    for module in (format, writer, walk, member_list):
        with contextlib.suppress(OSError, TypeError):
            code.update(Path(module.__file__).read_bytes())  # type: ignore[arg-type]
    with contextlib.suppress(OSError):
        code.update(Path(__file__).read_bytes())
    return f"{LAYER_FORMAT} {__version__} {code.hexdigest()[:16]}".encode()


class StoreLayer(Layer):
    """A tar of store paths, made from the files on disk.

    A layer in the cache may come with a member list (see member_list.py):
    then it is streamed from the list instead of a walk of the store. The
    list is checked first, in the writer's idle time if it has any: each
    directory, symlink and empty file must have the inode and ctime recorded
    (a directory's ctime changes when entries come or go); at the first
    difference the list is dropped and the layer is walked as if it had
    none. Files with contents are checked as they are opened: still regular
    files with the recorded mode, exactly as long, and hashed: the layer's
    digest must be the cached one.
    """

    def __init__(
        self,
        store: Store,
        paths: Sequence[str],
        encoder: HeaderEncoder,
        where: str,
        *,
        max_planned: int = MAX_PLANNED,
    ) -> None:
        self.store = store
        self.paths = tuple(paths)
        self.encoder = encoder
        self.where = where
        self.description = f"from paths: {json.dumps(list(self.paths))}"
        self.comment = f"store paths: {json.dumps(list(self.paths))}"
        # The layer's members, scanned and encoded ahead of streaming when the
        # writer has time, up to `max_planned` of them.
        self.planned: list[Member] = []
        self._max_planned = max_planned
        self._size: int | None = None
        self._scan: Iterator[Member] | None = None
        self._scan_started = 0  # time.time_ns() before the first walk read anything
        self._scanned = False
        self._walk_again: int | None = None  # the size a second walk must find
        self.cache: LayerCache | None = None  # where to record the member list
        self.cache_key: str | None = None
        self.cached: CachedLayer | None = None  # the cache's prediction, if any
        self.member_list: MemberList | None = None  # streamed instead of a walk
        self._checks: Iterator[bool] | None = None  # the member list's pending check

    # -- the cache ----------------------------------------------------------------

    def look_up(self, cache: LayerCache, database: StoreDatabase | None) -> bool:
        """Take the cache's prediction for this layer unless that is done; whether it
        was done now. A cached layer states its size, digest and checkpoints in
        advance, and may come with a member list to stream instead of a walk."""
        if self.cache is not None:
            return False
        self.cache = cache
        self.cache_key = self.key(database)
        self.cached = cache.get(self.cache_key)
        if self.cached is None:
            return True
        self.diff_id, self.checkpoints = self.cached.diff_id, self.cached.checkpoints
        members = cache.member_list(self.cache_key, list_tag())
        if members is not None:
            self.use_member_list(members)
        return True

    def key(self, database: StoreDatabase | None) -> str:
        """The layer's cache key (without looking it up)."""
        return self.cache_key or cache_key(self.recipe(database))

    def recipe(self, database: StoreDatabase | None) -> dict[str, Any]:
        """Everything the layer's bytes depend on, cheaply: the cache key's input."""
        paths = sorted(set(self.paths))
        return {
            "store_dir": self.store.store_dir,
            "root": os.fsdecode(self.store.root),
            "paths": paths,
            "identity": [self.store.identity(path, database) for path in paths],
            "owner": list(self.encoder.owner),
            "mtime": self.encoder.mtime,
        }

    def check(self, measured: Measured, number: int) -> None:
        """A cached layer's bytes must be the cached ones: else the entry is stale."""
        if self.cached is None:
            return
        if measured.broken:
            raise self.stale("its bytes no longer reach the cached layer's checkpoints")
        if self.cached.diff_id != measured.digest:
            raise self.stale(f"its digest is now {measured.digest}, not {self.cached.diff_id}")

    def entry(
        self, measured: Measured, blob: tuple[str, str, int] | None = None
    ) -> CachedLayer | None:
        """What the cache should now hold for this layer, if that is new: an entry
        for a layer that had none, checkpoints for one that had none, or the
        compressed `blob` (label, digest, size) made of it."""
        if self.cache_key is None:
            return None
        cached = self.cached
        if cached is None:
            return CachedLayer(
                measured.size, measured.digest, measured.checkpoints, blob_entries(blob)
            )
        new_checkpoints = measured.checkpoints and not cached.checkpoints
        new_blob = blob is not None and blob not in cached.blobs
        if not (new_checkpoints or new_blob):
            return None
        checkpoints = measured.checkpoints if new_checkpoints else cached.checkpoints
        return CachedLayer(cached.size, cached.diff_id, checkpoints, cached.with_blob(blob))

    def predicted(self) -> Measured | None:
        if self.cached is None:
            return None
        return Measured(self.cached.diff_id, self.cached.size, self.cached.checkpoints)

    def known_blob(self, label: str) -> tuple[str, int] | None:
        if self.cached is None:
            return None
        for known, digest, size in self.cached.blobs:
            if known == label:
                return digest, size
        return None

    def use_member_list(self, members: MemberList) -> None:
        """Stream from `members` if it passes its check (see `check_step`)."""
        self.member_list = members
        self._checks = self._check_members(members)

    def members(self) -> Iterator[Member]:
        """Walk the store paths, yielding each member's header, size, name, mode, identity."""
        if not self._scan_started:
            self._scan_started = time.time_ns()
        encode = self.encoder.encode
        for name, typeflag, mode, size, linkname, inode, ctime in self.store.iter_layer(
            self.paths, self.where
        ):
            yield encode(name, typeflag, mode, size, linkname), size, name, mode, inode, ctime

    def ahead_step(self) -> bool:
        """Check a little of the member list, or scan a little; False when nothing is left."""
        if self.member_list is not None:
            return self.check_step()
        return self.scan_step(256)

    def check_step(self) -> bool:
        """Check a slice of the member list; False once it is checked (or dropped)."""
        if self._checks is None:
            return False
        if next(self._checks, None) is None:
            self._checks = None
            return False
        return True

    def scan_step(self, count: int) -> bool:
        """Scan up to `count` more members ahead of time; False when it may not go on."""
        room = self._max_planned - len(self.planned)
        if self._scanned or room <= 0 or self._walk_again is not None:
            return False
        if self._scan is None:
            self._scan = self.members()
        step = min(count, room)
        before = len(self.planned)
        self.planned.extend(islice(self._scan, step))
        self._scanned = len(self.planned) - before < step
        return not self._scanned and len(self.planned) < self._max_planned

    # -- streaming ------------------------------------------------------------------

    def tar_size(self) -> int:
        if self._size is None:
            self._size = self._find_size()
        return self._size

    def _find_size(self) -> int:
        while self.check_step():
            pass
        if self.cached is not None:
            return self.cached.size
        if self._walk_again is not None:
            return self._walk_again
        while self.scan_step(4096):
            pass
        size = sum(len(header) + padded(size) for header, size, *_ in self.planned)
        size += len(END_OF_ARCHIVE)
        if not self._scanned:  # too many members to keep: count the rest, keep nothing
            assert self._scan is not None
            size += sum(len(header) + padded(size) for header, size, *_ in self._scan)
            self.planned, self._scan, self._walk_again = [], None, size
        return size

    def write_tar(self, out: TarSink, progress: Progress) -> None:
        chunks = self._open_member_list()
        if chunks is not None:
            written = self._write_listed(chunks, out, progress)
        else:
            written = self._write_walked(out, progress)
        out.write(END_OF_ARCHIVE)
        progress(written + len(END_OF_ARCHIVE))
        self.planned = []  # only needed once; free it

    def _write_walked(self, writer: TarSink, progress: Progress) -> int:
        # Whatever was scanned ahead, then the rest of the scan as it streams
        # (only a cached layer is streamed before its scan is complete).
        if self._scan is None:
            self._scan = self.members()
        members = chain(self.planned, self._scan)
        expected = self.cached.size if self.cached is not None else self._walk_again
        budget = None if expected is None else expected - len(END_OF_ARCHIVE)
        recorder = None
        if self.cache is not None and self.cache_key is not None:
            recorder = self.cache.start_member_list(self.cache_key, list_tag())
        record = recorder.add if recorder is not None else None
        write, write_file = writer.write, writer.write_file
        root = self.store.root + b"/"
        written = 0
        for count, member in enumerate(members, 1):
            header, size, name, _, _, _ = member
            written += len(header) + size + (-size % 512)
            if budget is not None and written > budget:
                raise self.stale(f"its tar is now bigger than the {budget} bytes expected")
            if size:  # only regular files have contents
                try:
                    write_file(header, root + name, size)
                except SourceError as error:
                    raise OperationError(f"{self.where}: {error}") from None
            else:
                write(header)
            if record is not None:
                record(member)
            if count % _PROGRESS_EVERY == 0:
                progress(written)
        if budget is not None and written != budget:
            raise self.stale(f"its tar is now smaller than the {budget} bytes expected")
        if recorder is not None:
            recorder.finish(read_since=self._scan_started)
        return written

    def _open_member_list(self) -> Iterator[Chunk] | None:
        """The member list's chunks, if there is a list and it can still be read."""
        if self.member_list is None:
            return None
        try:
            return self.member_list.chunks()
        except MemberListError as error:
            self._drop_member_list(error)
            return None

    def _drop_member_list(self, error: MemberListError | None = None) -> None:
        """Walk the layer after all: its list does not match the disk or cannot be read."""
        self.member_list = None
        if error is not None and not isinstance(error, MemberListGone) and self.cache is not None:
            self.cache.warn(f"ignoring an unreadable member list: {error}")

    def _write_listed(self, chunks: Iterator[Chunk], writer: TarSink, progress: Progress) -> int:
        assert self.cached is not None
        budget = self.cached.size - len(END_OF_ARCHIVE)
        write, write_file = writer.write, writer.write_file
        root = self.store.root + b"/"
        written = count = 0
        try:
            for chunk in chunks:
                headers = chunk.headers
                start = 0
                for name, size, mode, end in zip(
                    chunk.names, chunk.sizes, chunk.modes, chunk.ends, strict=True
                ):
                    written += end - start + size + (-size % 512)
                    if written > budget:
                        raise self.stale(f"its tar is now bigger than the {budget} bytes expected")
                    if size:
                        write_file(headers[start:end], root + name, size, mode)
                    else:
                        write(headers[start:end])
                    start = end
                    count += 1
                    if count % _PROGRESS_EVERY == 0:
                        progress(written)
        except MemberListError as error:
            raise self.stale(f"its member list is unreadable: {error}") from None
        except SourceError as error:
            if error.errno not in _GONE:  # not a sign of a changed store
                raise OperationError(f"{self.where}: {error}") from None
            raise self.stale(str(error)) from None
        except FileChanged as error:
            raise self.stale(str(error)) from None
        if written != budget:
            raise self.stale(f"its tar is now smaller than the {budget} bytes expected")
        return written

    def _check_members(self, members: MemberList) -> Iterator[bool]:
        """Compare listed members' identities with the disk's, a slice per step.

        Only members without contents: files with contents are checked as
        they are opened. At the first difference (or an unreadable list) the
        list is dropped.
        """
        root = self.store.root + b"/"
        lstat = os.lstat
        try:
            for chunk in members.chunks(headers=False):
                for count, (name, size, inode, ctime) in enumerate(
                    zip(chunk.names, chunk.sizes, chunk.inodes, chunk.ctimes, strict=True), 1
                ):
                    if inode and not size:
                        try:
                            st = lstat(root + name.rstrip(b"/"))
                        except OSError:
                            self._drop_member_list()
                            return
                        if st.st_ino != inode or st.st_ctime_ns != ctime:
                            self._drop_member_list()
                            return
                    if count % _CHECKS_PER_STEP == 0:
                        yield True
        except MemberListError as error:
            self._drop_member_list(error)

    def stale(self, why: str) -> OperationError:
        if self.cached is None:  # walked twice, and the two walks disagree
            return FileChanged(f"{self.where}: the store paths changed during the build ({why})")
        return StaleCacheEntry(
            f"{self.where}: the store paths changed since the layer cache recorded this "
            f"layer ({why}); the cache entry is dropped: run the build again, or build "
            "with --no-cache"
        )
