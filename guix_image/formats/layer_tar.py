"""What is inside one layer blob: its digests and its entries.

A layer is read as a stream: the blob (hashed, for its digest), inflated if
it is gzip or zstd (detected by content), hashed again (for the diff_id),
and parsed as a tar. Nothing is ever extracted; entry names are strings.
How much work is done is chosen per use: `inspect` only walks headers
(seeking over contents when it can), `verify` hashes, `diff-layers` also
hashes every file's contents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple, cast

from ..errors import ArchiveError
from ..model import SHA256_PREFIX
from ..tar.format import LNKTYPE
from ..tar.reader import TarMember, TarReader, is_climbing, normalise_member_name
from .limits import MAX_ENTRIES
from .streams import HashingReader, inflate, peek_compression

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


@dataclass(frozen=True)
class ReadOptions:
    hash_blob: bool = False  # sha256 of the blob as stored
    hash_diff: bool = False  # sha256 of the uncompressed tar (the diff_id)
    hash_files: bool = False  # sha256 of every regular file's contents
    keep_files: bool = False  # keep a full record of every entry
    keep_paths: bool = False  # keep every entry's path, type and size

    def covers(self, other: ReadOptions) -> bool:
        return all(
            mine or not theirs for mine, theirs in zip(self.flags(), other.flags(), strict=True)
        )

    def flags(self) -> tuple[bool, ...]:
        return (self.hash_blob, self.hash_diff, self.hash_files, self.keep_files, self.keep_paths)


HEADERS = ReadOptions()
PATHS = ReadOptions(keep_paths=True)
DIGESTS = ReadOptions(hash_blob=True, hash_diff=True)
FILES = ReadOptions(keep_files=True, keep_paths=True)
EVERYTHING = ReadOptions(True, True, True, True, True)


class Entry(NamedTuple):
    """What the merged filesystem and the waste need of an entry."""

    path: str
    type: str
    size: int


@dataclass(slots=True)
class FileRecord:
    """One entry of a layer, as reported by inspect and compared by diff-layers."""

    path: str  # normalised: no leading '/' or './'
    type: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: float
    size: int
    linkname: str
    sha256: str | None = None

    @property
    def is_whiteout(self) -> bool:
        return self.path.rsplit("/", 1)[-1].startswith(WHITEOUT_PREFIX)

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "type": self.type,
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
            "uname": self.uname,
            "gname": self.gname,
            "mtime": self.mtime,
            "size": self.size,
            "linkname": self.linkname,
            "sha256": self.sha256,
        }


@dataclass
class LayerContents:
    """What reading a layer found; `entry_list` is the records or the light entries."""

    compression: str
    entries: int
    blob_digest: str | None = None
    blob_size: int | None = None
    diff_id: str | None = None
    size: int | None = None  # uncompressed bytes
    files: list[FileRecord] | None = None
    paths: list[Entry] | None = None
    duplicates: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)  # names or hard links that climb out
    hard_links: int = 0
    # Hard links whose target is not an earlier entry of this layer: docker
    # cannot extract them (it links to what it has extracted already).
    unlinkable: list[str] = field(default_factory=list)

    def entry_list(self) -> list[FileRecord] | list[Entry]:
        return self.files if self.files is not None else self.paths or []


def read_layer(
    stream: BinaryIO, name: str, options: ReadOptions, *, blob_size: int | None = None
) -> LayerContents:
    """Read a layer blob from `stream` (positioned at its start) as `options` ask."""
    stream, compression = peek_compression(stream)
    hashing = options.hash_blob or options.hash_diff
    whole = None
    if compression == "none" and hashing and not options.hash_files and hasattr(stream, "digest"):
        # Hash the blob in one sequential pass at full speed, then walk its
        # headers by seeking: no Python work per block of contents.
        whole = stream.digest()
        hashing = False
    raw: BinaryIO | HashingReader = stream
    if compression == "none":  # the blob is the tar: one hash serves as both digests
        data: BinaryIO | HashingReader = HashingReader(stream) if hashing else stream
    else:
        raw = HashingReader(stream) if options.hash_blob else stream
        inflated = inflate(cast(BinaryIO, raw), compression, name, blob_size)
        data = HashingReader(inflated, hashing=options.hash_diff)  # counts its size at least
    reader = TarReader(cast(BinaryIO, data), name=name)
    contents = LayerContents(compression=compression, entries=0)
    if options.keep_files:
        contents.files = []
    elif options.keep_paths:
        contents.paths = []
    seen: set[str] = set()
    try:
        for member in reader:
            contents.entries += 1
            if contents.entries > MAX_ENTRIES:
                raise ArchiveError(f"{name}: more than {MAX_ENTRIES} entries; refusing")
            key = _note_entry(contents, seen, member)
            digest = _hash_content(reader) if options.hash_files and member.isreg() else None
            if contents.files is not None:
                contents.files.append(_record(key, member, digest))
            elif contents.paths is not None:
                contents.paths.append(Entry(key, member.type_name, member.size))
    except ArchiveError as error:
        if contents.entries == 0 and error.offset == 0:  # its very first header is wrong
            reason = str(error).split(": at byte 0: ", 1)[-1]
            raise ArchiveError(f"{name}: not a tar archive ({reason})") from None
        raise
    if isinstance(data, HashingReader):
        data.read_to_end()  # the zero blocks after the end marker count too
        contents.size = data.size
        if data.hashing:
            contents.diff_id = data.digest
    elif blob_size is not None:
        contents.size = blob_size
    if whole is not None:
        contents.diff_id = contents.blob_digest = whole[0]
        contents.size = contents.blob_size = whole[1]
    elif compression == "none" and isinstance(data, HashingReader) and data.hashing:
        contents.blob_digest, contents.blob_size = data.digest, data.size
    elif isinstance(raw, HashingReader):
        raw.read_to_end()
        contents.blob_digest, contents.blob_size = raw.digest, raw.size
    return contents


def _note_entry(contents: LayerContents, seen: set[str], member: TarMember) -> str:
    """Note duplicates and escaping names; the entry's normalised path."""
    key = normalise_member_name(member.name)
    if key in seen:
        contents.duplicates.append(member.name)
    else:
        seen.add(key)
    if is_climbing(member.name.lstrip("/")) or (
        member.type == LNKTYPE and is_climbing(member.linkname.lstrip("/"))
    ):
        contents.unsafe.append(member.name)
    if member.type == LNKTYPE:
        contents.hard_links += 1
        target = normalise_member_name(member.linkname)
        if target == key or target not in seen:
            contents.unlinkable.append(member.name)
    return key


def _hash_content(reader: TarReader) -> str:
    digest = hashlib.sha256()
    for chunk in reader.iter_content():
        digest.update(chunk)
    return SHA256_PREFIX + digest.hexdigest()


def _record(path: str, member: TarMember, digest: str | None) -> FileRecord:
    return FileRecord(
        path=path,
        type=member.type_name,
        mode=member.mode,
        uid=member.uid,
        gid=member.gid,
        uname=member.uname,
        gname=member.gname,
        mtime=member.mtime,
        size=member.size,
        linkname=member.linkname,
        sha256=digest,
    )
