"""The layer cache: each store layer's size and digest, from an earlier build.

Store paths do not change once registered, so a layer's tar is determined by
its store paths, their identity (the NAR hash from the store database, or the
inode and times of each path) and every option that changes the bytes. The
key hashes all of that. An entry is only a prediction: the build still hashes
every byte and fails, dropping the entry, if the prediction was wrong.

Entries are small JSON files written atomically (temporary file + rename),
so builds running at once never see half an entry. Next to an entry, the
layer's member list (member_list.py) lets a rebuild skip the walk of the
store; lists are larger (about 800 bytes per file), so the least recently
used go first when they take more than MEMBER_LISTS_BUDGET.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import strict_json
from ..fastpath import sha256
from ..files import read_regular
from ..formats.oci_layout import BlobStore
from ..model import canonical_json, is_sha256_digest
from . import member_list
from .member_list import MemberList, MemberListError, MemberListWriter, OtherWriter

ENTRY_VERSION = 1
# Bump when the bytes written for the same inputs change (tar encoding, ordering...).
LAYER_FORMAT = "guix-image/layer-tar/1"

_HEX = re.compile(r"(?:[0-9a-f]{2})*")
MEMBER_LISTS_BUDGET = 512 << 20
BLOBS_BUDGET = 2 << 30  # compressed layer blobs kept for rebuilds
# An entry holds its checkpoints: 64 hex digits per 4 MiB, 16 MiB for a 1 TiB layer.
MAX_ENTRY_SIZE = 16 << 20
_MEMBERS = ".members"
_TEMPORARY_PREFIXES = (".entry-", member_list.TEMPORARY_PREFIX)
_ABANDONED = 24 * 3600  # seconds after which a temporary file is a crashed build's
_ORPHANED = 3600  # seconds after which a member list with no entry is a crashed build's


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "guix-image"


def cache_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"format": LAYER_FORMAT, **recipe})).hexdigest()


# A compressed blob made of a layer: (Compression.label, digest, size).
BlobEntry = tuple[str, str, int]
MAX_BLOBS_PER_LAYER = 4  # compressors remembered for one layer, the latest first


def blob_entries(blob: BlobEntry | None) -> tuple[BlobEntry, ...]:
    return () if blob is None else (blob,)


@dataclass(frozen=True)
class CachedLayer:
    size: int
    diff_id: str
    checkpoints: bytes = b""  # see sha256.py; none if they could not be taken
    # The compressed blobs made of it, kept in the cache's blob store (see build/oci.py).
    blobs: tuple[BlobEntry, ...] = ()

    def with_blob(self, blob: BlobEntry | None) -> tuple[BlobEntry, ...]:
        """Its blobs with `blob` first, in place of another by the same compressor."""
        if blob is None:
            return self.blobs
        others = [entry for entry in self.blobs if entry[0] != blob[0]]
        return (blob, *others)[:MAX_BLOBS_PER_LAYER]


class LayerCache:
    """Entries and member lists under `directory`; `warn` hears what is ignored.

    Checkpoints are taken and kept every `checkpoint_interval` bytes of a
    layer (see fastpath/sha256.py); entries with another interval have none.
    A member list is not kept if a ctime in it is `racy_margin` ns or less
    older than its walk (see member_list.py).
    """

    def __init__(
        self,
        directory: Path,
        warn: Callable[[str], None],
        *,
        checkpoint_interval: int = sha256.CHECKPOINT_INTERVAL,
        racy_margin: int = member_list.RACY_NS,
    ) -> None:
        self.directory = directory / "layers"
        self.warn = warn
        self.checkpoint_interval = checkpoint_interval
        self._racy_margin = racy_margin
        self._writable = True
        # This build's member lists: those being written, by key, and the
        # paths of those it read or wrote, which trimming must leave alone.
        self._pending: list[tuple[str, MemberListWriter]] = []
        self._in_use: set[str] = set()

    @property
    def blobs(self) -> BlobStore:
        """Where compressed layer blobs are kept, by digest (see build/oci.py)."""
        return BlobStore(str(self.directory.parent))

    def use_blobs(self, digests: list[str]) -> None:
        """Mark blobs as this build's: recently used, and not trimmed by it."""
        for digest in digests:
            path = self.blobs.path(digest)
            with contextlib.suppress(OSError):
                os.utime(path)
            self._in_use.add(path)

    def trim_blobs(self, budget: int = BLOBS_BUDGET) -> None:
        """Remove the least recently used blobs beyond `budget` bytes, and
        temporary files a crashed build left (housekeeping: never fails)."""
        _trim_directory(self.blobs.directory, budget, self._in_use)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def _members_path(self, key: str) -> Path:
        return self.directory / f"{key}{_MEMBERS}"

    def get(self, key: str) -> CachedLayer | None:
        path = self._path(key)
        try:
            data = read_regular(path, MAX_ENTRY_SIZE, follow=False)
        except FileNotFoundError:
            return None
        except OSError as error:
            self.warn(f"cannot read cache entry {path}: {error.strerror}; dropping it")
            self.drop(key)
            return None
        entry = _parse_entry(data, key, self.checkpoint_interval)
        if entry is None:
            self.warn(f"ignoring unreadable cache entry {path}; dropping it")
            self.drop(key)
        return entry

    def put(self, key: str, layer: CachedLayer) -> None:
        """Record entry `key`; if it cannot be, its member list goes too (a list
        is only ever used with its entry, and would stay unused)."""
        if not self._writable:
            self._forget_member_list(key)
            return
        document = {
            "version": ENTRY_VERSION,
            "key": key,
            "size": layer.size,
            "diff_id": layer.diff_id,
        }
        if layer.checkpoints:
            document["checkpoints"] = {
                "interval": self.checkpoint_interval,
                "states": layer.checkpoints.hex(),
            }
        if layer.blobs:
            document["blobs"] = [
                {"compression": label, "digest": digest, "size": size}
                for label, digest, size in layer.blobs
            ]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            import tempfile  # here: a rebuild adds no entry, and skips the import

            fd, temporary = tempfile.mkstemp(prefix=".entry-", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(canonical_json(document))
                os.replace(temporary, self._path(key))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as error:
            self._unwritable(error)
            self._forget_member_list(key)

    def _forget_member_list(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self._members_path(key).unlink()

    def _unwritable(self, error: OSError) -> None:
        if self._writable:
            self.warn(f"cannot write the layer cache in {self.directory}: {error.strerror}")
        self._writable = False

    def drop(self, key: str) -> None:
        """Remove entry `key` and its member list (housekeeping: never fails)."""
        for path in (self._path(key), self._members_path(key)):
            with contextlib.suppress(OSError):
                path.unlink()

    def member_list(self, key: str, tag: bytes) -> MemberList | None:
        """The member list recorded with entry `key` by the code that `tag` names,
        if there is a usable one."""
        if not member_list.USABLE:
            return None
        path = self._members_path(key)
        try:
            members = MemberList(str(path), tag)
        except (FileNotFoundError, OtherWriter):
            return None  # none, or one from another version: walked and recorded again
        except MemberListError as error:
            self.warn(f"ignoring unreadable member list {path}: {error}")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: trimmed last
        self._in_use.add(str(path))
        return members

    def start_member_list(self, key: str, tag: bytes) -> MemberListWriter | None:
        """A writer for entry `key`'s member list, kept if `commit_member_lists` follows.

        `tag` names the code that writes it (see MemberList)."""
        if not self._writable or not member_list.USABLE:
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            writer = MemberListWriter(
                self.directory, tag, self._unwritable, racy_margin=self._racy_margin
            )
        except OSError as error:
            self._unwritable(error)
            return None
        self._pending.append((key, writer))
        return writer

    def commit_member_lists(self) -> None:
        """Keep every complete member list written since the last commit or release."""
        for key, writer in self._pending:
            path = self._members_path(key)
            try:
                writer.commit(path)
                self._in_use.add(str(path))
            except OSError as error:
                self._unwritable(error)
        self._pending.clear()
        self._trim()

    def release(self) -> None:
        """Delete the member lists written but not committed."""
        for _, writer in self._pending:
            writer.abort()
        self._pending.clear()

    def _trim(self, budget: int = MEMBER_LISTS_BUDGET) -> None:
        """Remove least recently used member lists beyond `budget` bytes, and crashes'
        leftovers: temporary files, and lists whose entry was never written (a build
        commits a list just before its entry).

        Housekeeping, never a reason to fail: another build may be renaming
        or trimming the same files.
        """
        lists: list[tuple[int, int, str]] = []
        now = time.time()
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.name.endswith(_MEMBERS):
                            st = entry.stat(follow_symlinks=False)
                            key = entry.name[: -len(_MEMBERS)]
                            if now - st.st_mtime > _ORPHANED and not self._path(key).exists():
                                os.unlink(entry.path)
                                continue
                            lists.append((st.st_mtime_ns, st.st_size, entry.path))
                        elif entry.name.startswith(_TEMPORARY_PREFIXES) and _abandoned(entry, now):
                            os.unlink(entry.path)
        except OSError:
            return
        _remove_least_recent(lists, budget, self._in_use)


def _remove_least_recent(files: list[tuple[int, int, str]], budget: int, in_use: set[str]) -> None:
    """Remove the least recent of `files` (mtime, size, path) until they fit in
    `budget` bytes; never those `in_use` (this build's: never thrash what it used)."""
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= budget:
            break
        if path in in_use:
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
        total -= size


def _trim_directory(directory: str, budget: int, in_use: set[str]) -> None:
    """Remove least recently used files of `directory` beyond `budget` bytes
    (not those `in_use`), and abandoned temporary files (dot-names)."""
    files: list[tuple[int, int, str]] = []
    now = time.time()
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.name.startswith("."):
                        if _abandoned(entry, now):
                            os.unlink(entry.path)
                    else:
                        st = entry.stat(follow_symlinks=False)
                        files.append((st.st_mtime_ns, st.st_size, entry.path))
    except OSError:
        return
    _remove_least_recent(files, budget, in_use)


def _abandoned(entry: os.DirEntry[str], now: float) -> bool:
    return now - entry.stat(follow_symlinks=False).st_mtime > _ABANDONED


def _parse_entry(data: bytes, key: str, interval: int) -> CachedLayer | None:
    try:
        document = strict_json.loads(data)
    except strict_json.JSONRefused:
        return None
    if not isinstance(document, dict) or document.get("version") != ENTRY_VERSION:
        return None
    size, diff_id = document.get("size"), document.get("diff_id")
    if (
        document.get("key") != key
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
    ):
        return None
    if not is_sha256_digest(diff_id):
        return None
    checkpoints = _parse_checkpoints(document.get("checkpoints", {}), size, interval)
    blobs = _parse_blobs(document.get("blobs", []))
    if checkpoints is None or blobs is None:
        return None
    return CachedLayer(size, diff_id, checkpoints, blobs)


def _parse_blobs(field: Any) -> tuple[BlobEntry, ...] | None:
    """An entry's compressed blobs; None if malformed."""
    if not isinstance(field, list):
        return None
    blobs = []
    for blob in field[:MAX_BLOBS_PER_LAYER]:
        if not isinstance(blob, dict):
            return None
        label, digest, size = blob.get("compression"), blob.get("digest"), blob.get("size")
        if not isinstance(label, str) or not is_sha256_digest(digest):
            return None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        blobs.append((label, digest, size))
    return tuple(blobs)


def _parse_checkpoints(field: Any, size: int, interval: int) -> bytes | None:
    """An entry's checkpoints; None if malformed, none if taken at another interval."""
    if not isinstance(field, dict):
        return None
    recorded, states = field.get("interval", interval), field.get("states", "")
    if not isinstance(states, str) or not _HEX.fullmatch(states):
        return None
    if recorded != interval:
        return b""  # written with another interval: hash in one chain
    checkpoints = bytes.fromhex(states)
    count = sha256.checkpoint_count(size, interval)
    if checkpoints and len(checkpoints) != count * sha256.STATE_SIZE:
        return None
    return checkpoints
