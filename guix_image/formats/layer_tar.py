"""What is inside one layer blob: its digests and its entries.

A layer is read as a stream: the blob (hashed, for its digest), inflated if
it is gzip or zstd (detected by content), hashed again (for the diff_id),
and parsed as a tar. Nothing is ever extracted; entry names are strings.
How much work is done is chosen per use: `inspect` only walks headers
(seeking over contents when it can), `verify` hashes, `diff-layers` also
hashes every file's contents.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from ..errors import ArchiveError
from ..model import SHA256_PREFIX
from ..spill import Scratch, SortedRows
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
    keep_files: bool = False  # a list of every entry's FileRecord, in archive order
    keep_records: bool = False  # every entry's full record in its sorted row

    def covers(self, other: ReadOptions) -> bool:
        return all(
            mine or not theirs for mine, theirs in zip(self.flags(), other.flags(), strict=True)
        )

    def flags(self) -> tuple[bool, ...]:
        return (self.hash_blob, self.hash_diff, self.hash_files, self.keep_files, self.keep_records)


HEADERS = ReadOptions()
DIGESTS = ReadOptions(hash_blob=True, hash_diff=True)
RECORDS = ReadOptions(keep_records=True)
FILES = ReadOptions(keep_files=True, keep_records=True)
EVERYTHING = ReadOptions(True, True, True, True, True)

# What a layer's entries are to the merged filesystem, as the kind of a row.
ENTRY = 0  # a file, directory, link, ...: at its own path
WHITEOUT = 1  # .wh.NAME: deletes NAME (the row's path) and everything below it
OPAQUE = 2  # .wh..wh..opq: hides the lower layers' contents of its directory (the row's path)
LINK_TARGET = 3  # where a hard link points (to check that it points back)
# A directory the layer makes without an entry for it (as loaders do for an
# entry's missing parents): it hides a lower layer's file there.
IMPLIED = 4


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
    # Extended attributes (PAX SCHILY.xattr.NAME, or LIBARCHIVE.xattr.NAME in
    # base64), by name; None where there are none.
    xattrs: dict[str, str] | None = None

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
            **({"xattrs": self.xattrs} if self.xattrs else {}),
        }


# A layer's entries are kept as rows, plain tuples sorted by their first field
# (so that they come in tree order: a directory, then everything below it):
#   (tree_key(path), position in the layer from 0, kind, type name, size,
#    the name as stored where it is not the normalised path (else None),
#    the FileRecord's fields with keep_records (else None))
# where the path is the one the entry acts on (a whiteout's: what it deletes).
KEY, SEQ, KIND, TYPE, SIZE, STORED_NAME, RECORD = range(7)


def tree_key(path: str) -> bytes:
    """Sorts as paths do component by component: '/' becomes NUL, below every other byte."""
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\0")


def key_path(key: bytes) -> str:
    return key.replace(b"\0", b"/").decode("utf-8", "surrogateescape")


@dataclass
class LayerContents:
    """What reading a layer found."""

    compression: str
    entries: int
    blob_digest: str | None = None
    blob_size: int | None = None
    diff_id: str | None = None
    size: int | None = None  # uncompressed bytes
    rows: SortedRows = field(default_factory=SortedRows)  # see KEY, SEQ, ... above
    files: list[FileRecord] | None = None
    duplicates: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)  # names or hard links that climb out
    hard_links: int = 0
    whiteouts: int = 0  # opaque ones too
    implied_directories: int = 0  # directories made for entries, with no entry of their own
    known_directory: str = ""  # while reading: a directory the layer is known to have
    # Hard links whose target is not an earlier entry of this layer: docker
    # cannot extract them (it links to what it has extracted already).
    unlinkable: list[str] = field(default_factory=list)

    def records_in_archive_order(self) -> Iterator[FileRecord]:
        """The entries as the layer holds them (read with keep_records), bounded in memory."""
        by_position = SortedRows(self.rows.scratch)
        for row in self.rows:
            if row[KIND] not in (LINK_TARGET, IMPLIED):
                by_position.append((row[SEQ], row[RECORD]))
        for _, record in by_position:
            yield FileRecord(*record)


def read_layer(
    stream: BinaryIO,
    name: str,
    options: ReadOptions,
    *,
    blob_size: int | None = None,
    scratch: Scratch | None = None,
) -> LayerContents:
    """Read a layer blob from `stream` (positioned at its start) as `options` ask.

    Its entries become sorted rows, spilled to `scratch` (or a file of their
    own) beyond what memory holds, so that memory stays bounded whatever
    the layer holds.
    """
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
    contents = LayerContents(compression, 0, rows=SortedRows(scratch))
    if options.keep_files:
        contents.files = []
    try:
        for member in reader:
            if contents.entries >= MAX_ENTRIES:
                raise ArchiveError(f"{name}: more than {MAX_ENTRIES} entries; refusing")
            _note_entry(contents, member, options, reader)
    except ArchiveError as error:
        if contents.entries == 0 and error.offset == 0:  # its very first header is wrong
            reason = str(error).split(": at byte 0: ", 1)[-1]
            raise ArchiveError(f"{name}: not a tar archive ({reason})") from None
        raise
    _check_names(contents)
    contents.rows.settle()
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


def _note_entry(
    contents: LayerContents, member: TarMember, options: ReadOptions, reader: TarReader
) -> None:
    """Add the member's rows, noting names that climb out and hard links."""
    seq = contents.entries
    contents.entries += 1
    name = member.name
    path = normalise_member_name(name)
    if is_climbing(name.lstrip("/")) or (
        member.type == LNKTYPE and is_climbing(member.linkname.lstrip("/"))
    ):
        contents.unsafe.append(name)
    if member.type == LNKTYPE:
        contents.hard_links += 1
        target = normalise_member_name(member.linkname)
        if target == path:
            contents.unlinkable.append(name)
        else:  # checked once the layer is read: does an earlier entry have that path?
            contents.rows.append((tree_key(target), seq, LINK_TARGET, "", 0, name, None))
    record = None
    if options.keep_records or options.keep_files:
        digest = _hash_content(reader) if options.hash_files and member.isreg() else None
        record = _record(path, member, digest)
        if contents.files is not None:
            contents.files.append(FileRecord(*record))
    kind, placed = _placement(path)
    if kind in (WHITEOUT, OPAQUE):
        contents.whiteouts += 1
    type_name = member.type_name
    parent = path.rpartition("/")[0]
    if parent != contents.known_directory:
        for directory in _made_directories(parent, contents.known_directory):
            contents.rows.append((tree_key(directory), seq, IMPLIED, "dir", 0, None, None))
            contents.implied_directories += 1
    contents.known_directory = path if type_name == "dir" else parent
    stored = name if name != path else None
    kept = record if options.keep_records else None
    contents.rows.append((tree_key(placed), seq, kind, type_name, member.size, stored, kept))


def _made_directories(parent: str, known: str) -> list[str]:
    """The directories above an entry (`parent` and its own) that `known` (a
    directory the layer has, so its parents too) does not already make: those
    the loader makes for the entry. In a layer written in tree order, with its
    directories declared, there are none."""
    if known == parent or known.startswith(parent + "/") or not parent:
        return []
    parts, known_parts = parent.split("/"), known.split("/") if known else []
    shared = 0
    while shared < min(len(parts), len(known_parts)) and parts[shared] == known_parts[shared]:
        shared += 1
    return ["/".join(parts[:depth]) for depth in range(shared + 1, len(parts) + 1)]


def _placement(path: str) -> tuple[int, str]:
    """What an entry is to the merged filesystem, and the path it acts on."""
    if WHITEOUT_PREFIX not in path:
        return ENTRY, path  # the common case, kept fast
    directory, _, base = path.rpartition("/")
    if base == OPAQUE_WHITEOUT:
        return OPAQUE, directory
    if base.startswith(WHITEOUT_PREFIX):
        return WHITEOUT, f"{directory}/{base[len(WHITEOUT_PREFIX) :]}".lstrip("/")
    return ENTRY, path


def _check_names(contents: LayerContents) -> None:
    """Duplicate paths, and hard links to no earlier entry, found in one pass over
    the sorted rows (a set of every path would not fit in bounded memory)."""
    current = None  # the path (tree key) of the rows at hand
    kinds: set[int] = set()  # the kinds of entry seen at it
    first_entry = -1  # the position of the first entry at it
    for key, seq, kind, _, _, stored, record in contents.rows:
        if key != current:
            current, first_entry = key, -1
            kinds.clear()
        if kind == LINK_TARGET:
            if not 0 <= first_entry < seq:
                contents.unlinkable.append(stored)
            continue
        if kind == IMPLIED:
            continue
        if kind in kinds:
            contents.duplicates.append(stored or (record[0] if record else key_path(key)))
        kinds.add(kind)
        if kind == ENTRY and first_entry < 0:
            first_entry = seq


def _hash_content(reader: TarReader) -> str:
    digest = hashlib.sha256()
    for chunk in reader.iter_content():
        digest.update(chunk)
    return SHA256_PREFIX + digest.hexdigest()


def xattrs(pax: dict[str, str]) -> dict[str, str] | None:
    """The extended attributes PAX records carry, as GNU tar and libarchive write
    them (a value that is not UTF-8 keeps its bytes as surrogate escapes)."""
    found = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            found[key.removeprefix("SCHILY.xattr.")] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key.removeprefix("LIBARCHIVE.xattr."))
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                raw = value.encode("utf-8", "surrogateescape")
            found.setdefault(name, raw.decode("utf-8", "surrogateescape"))
    return dict(sorted(found.items())) or None


def _record(path: str, member: TarMember, digest: str | None) -> tuple[Any, ...]:
    """A FileRecord's fields, in order."""
    return (
        path,
        member.type_name,
        member.mode,
        member.uid,
        member.gid,
        member.uname,
        member.gname,
        member.mtime,
        member.size,
        member.linkname,
        digest,
        xattrs(member.pax) if member.pax else None,
    )
