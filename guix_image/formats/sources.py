"""Reading image archives: where their members are, whatever the form.

Three sources hold the same kind of content: a tar file on disk (read by
seeking: Docker and OCI archives), an OCI layout directory, and a tar
stream read once from standard input. The format modules (docker_archive,
oci_layout) find images through the `Source` interface; layers are read
through it too (see stored_layer.py), so every command works on every form.

Nothing is extracted. Member names are looked up as loaders do (leading
'/' and './' ignored); duplicates and names that climb out are refused;
symlinked members (which `docker save` writes for repeated layers) are
followed inside the archive only, a bounded number of times.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any, BinaryIO, cast

from .. import strict_json
from ..errors import ArchiveError, InputError
from ..files import open_regular
from ..model import sha256_digest
from ..spill import Scratch
from ..tar.format import BLOCK, LNKTYPE, REGTYPE, SYMTYPE
from ..tar.reader import TarMember, TarReader, is_climbing, normalise_member_name
from .documents import parse_image_config, parse_json
from .layer_tar import LayerContents, ReadOptions, read_layer
from .limits import (
    MAX_CONFIG_SIZE,
    MAX_CONFIGS_BYTES,
    MAX_LINK_HOPS,
    MAX_MEMBERS,
    MAX_STREAM_METADATA,
)
from .streams import SliceReader, detect_compression, inflate, peek_compression


class ConfigReader:
    """Reads each config once, however many images share it, within a byte budget."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._seen: dict[str, tuple[bytes, dict[str, Any], str]] = {}
        self._total = 0

    def read(self, location: str) -> tuple[bytes, dict[str, Any], str]:
        """The config's bytes, parsed document and digest (each computed once)."""
        key = normalise_member_name(location)
        if key not in self._seen:
            data = self.source.read_bytes(location, MAX_CONFIG_SIZE, "config")
            self._total += len(data)
            if self._total > MAX_CONFIGS_BYTES:
                raise ArchiveError(
                    f"{self.source.name}: more than {MAX_CONFIGS_BYTES} bytes of configs; refusing"
                )
            where = f"{self.source.name}: config {location!r}"
            digest = sha256_digest(data)
            self._seen[key] = (data, parse_image_config(data, where), digest)
        return self._seen[key]


class Source:
    """Members of an archive, by name."""

    name: str
    kind: str  # "tar", "directory", "stream"
    compression = "none"  # of the whole archive

    def exists(self, location: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, location: str, limit: int, what: str) -> bytes:
        raise NotImplementedError

    def size_of(self, location: str) -> int:
        raise NotImplementedError

    def read_layer(
        self, location: str, index: int, size: int, options: ReadOptions, scratch: Scratch | None
    ) -> LayerContents:
        """What is inside layer `index` (from 1), the blob at `location` of `size` bytes;
        its rows spill to `scratch`. (Read from `open_blob`, unless a source knows better.)"""
        name = layer_name(self.name, index, location)
        with self.open_blob(location) as blob:
            return read_layer(blob, name, options, blob_size=size, scratch=scratch)

    def open_blob(self, location: str) -> BinaryIO:
        """A stream of a member's bytes (not for stream sources)."""
        raise NotImplementedError

    def extent(self, location: str) -> tuple[str, int, int] | None:
        """(file, offset, size) of a member stored verbatim in a file, if it is."""
        return None

    def close(self) -> None:
        pass

    def read_json(self, location: str, limit: int, what: str) -> Any:
        return parse_json(self.read_bytes(location, limit, what), f"{self.name}: {what}")

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TarSource(Source):
    """A seekable tar file: an index of its members, read by seeking."""

    kind = "tar"

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as error:
            raise InputError(f"{path}: {error.strerror}") from None
        try:
            self.members = _index(TarReader(self._file, name=path), path)
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def _member(self, location: str, what: str) -> TarMember:
        return _resolve(self.members, location, what, self.name)

    def exists(self, location: str) -> bool:
        return normalise_member_name(location) in self.members

    def size_of(self, location: str) -> int:
        return self._member(location, "member").size

    def read_bytes(self, location: str, limit: int, what: str) -> bytes:
        member = self._member(location, what)
        _check_limit(member.size, limit, what, self.name)
        self._file.seek(member.offset)
        data = self._file.read(member.size)
        if len(data) != member.size:
            raise ArchiveError(f"{self.name}: truncated archive: {what} is cut short")
        return data

    def open_blob(self, location: str) -> BinaryIO:
        member = self._member(location, "member")
        # A file handle per blob: layers may be read by several threads at once.
        return SliceReader(open(self.name, "rb"), member.offset, member.size)  # type: ignore[return-value]

    def extent(self, location: str) -> tuple[str, int, int] | None:
        member = self._member(location, "member")
        return self.name, member.offset, member.size

    def read_layer(
        self, location: str, index: int, size: int, options: ReadOptions, scratch: Scratch | None
    ) -> LayerContents:
        blob = self.open_blob(location)
        name = layer_name(self.name, index, location)
        try:
            return read_layer(blob, name, options, blob_size=size, scratch=scratch)
        finally:
            blob.close()


class DirectorySource(Source):
    """An OCI image layout directory. Only plain files inside it are read."""

    kind = "directory"

    def __init__(self, path: str) -> None:
        self.name = path
        self.root = os.path.realpath(path)

    def _path(self, location: str, what: str) -> str:
        relative = normalise_member_name(location)
        if not relative or is_climbing(location.lstrip("/")):
            raise ArchiveError(f"{self.name}: {what} {location!r} is outside the layout")
        path = os.path.join(self.root, relative)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ArchiveError(f"{self.name}: {what} {location!r} is missing") from None
        if not stat.S_ISREG(mode):
            raise ArchiveError(f"{self.name}: {what} {location!r} is not a regular file")
        if os.path.realpath(path) != path:
            raise ArchiveError(f"{self.name}: {what} {location!r} is reached through a symlink")
        return path

    def exists(self, location: str) -> bool:
        relative = normalise_member_name(location)
        return bool(relative) and os.path.isfile(os.path.join(self.root, relative))

    def size_of(self, location: str) -> int:
        return os.stat(self._path(location, "member")).st_size

    def read_bytes(self, location: str, limit: int, what: str) -> bytes:
        path = self._path(location, what)
        _check_limit(os.stat(path).st_size, limit, what, self.name)
        with self._open(path, location, what) as f:
            return f.read(limit + 1)

    def open_blob(self, location: str) -> BinaryIO:
        return self._open(self._path(location, "member"), location, "member")

    def _open(self, path: str, location: str, what: str) -> BinaryIO:
        try:
            return open(open_regular(path, follow=False), "rb")
        except OSError as error:  # unreadable: the layout is not one we can read
            reason = error.strerror or str(error)
            raise ArchiveError(
                f"{self.name}: {what} {location!r} cannot be read: {reason}"
            ) from None

    def extent(self, location: str) -> tuple[str, int, int] | None:
        path = self._path(location, "member")
        return path, 0, os.stat(path).st_size


class StreamSource(Source):
    """A tar stream read once: metadata kept, every other member read as a layer.

    Which members are layers is only known from manifest.json or index.json,
    which may come last, so every member that is not JSON metadata is read
    as a layer with `options` while it streams past, and the results kept.
    """

    kind = "stream"

    def __init__(
        self, stream: BinaryIO, name: str, options: ReadOptions, compression: str = "none"
    ) -> None:
        self.name = name
        self.options = options
        self.compression = compression  # of the whole archive
        self.scratch = Scratch()  # for the rows of every layer of the stream
        self.members: dict[str, TarMember] = {}
        self.metadata: dict[str, bytes] = {}
        self.layers: dict[str, LayerContents | ArchiveError] = {}
        kept = 0
        reader = TarReader(stream, name=name)
        for member in _members(reader, name, self.members):
            if member.type != REGTYPE:
                continue
            key = normalise_member_name(member.name)
            if member.size <= MAX_CONFIG_SIZE:
                data = reader.read()
                if _looks_like_metadata(key, data):
                    kept += len(data)
                    if kept > MAX_STREAM_METADATA:
                        raise ArchiveError(f"{name}: more than {MAX_STREAM_METADATA} bytes of JSON")
                    self.metadata[key] = data
                    continue
                self.layers[key] = self._read_layer(io.BytesIO(data), key, member.size)
            else:
                content = cast(BinaryIO, _MemberStream(reader))
                self.layers[key] = self._read_layer(content, key, member.size)

    def _read_layer(self, stream: BinaryIO, key: str, size: int) -> LayerContents | ArchiveError:
        try:
            name = f"{self.name}: {key}"
            return read_layer(stream, name, self.options, blob_size=size, scratch=self.scratch)
        except ArchiveError as error:  # it may not be a layer at all: report it only if it is
            return error

    def _key(self, location: str, what: str) -> str:
        return normalise_member_name(_resolve(self.members, location, what, self.name).name)

    def exists(self, location: str) -> bool:
        return normalise_member_name(location) in self.members

    def size_of(self, location: str) -> int:
        return _resolve(self.members, location, "member", self.name).size

    def read_bytes(self, location: str, limit: int, what: str) -> bytes:
        member = _resolve(self.members, location, what, self.name)
        _check_limit(member.size, limit, what, self.name)
        key = normalise_member_name(member.name)
        if key not in self.metadata:
            raise ArchiveError(f"{self.name}: {what} {location!r} is not JSON")
        return self.metadata[key]

    def read_layer(
        self, location: str, index: int, size: int, options: ReadOptions, scratch: Scratch | None
    ) -> LayerContents:
        if not self.options.covers(options):
            raise RuntimeError("the stream was read with too few options")
        result = self.layers.get(self._key(location, f"layer {index}"))
        if result is None:
            raise ArchiveError(f"{layer_name(self.name, index, location)} is JSON, not a layer")
        if isinstance(result, ArchiveError):
            raise result
        return result


class _MemberStream(io.RawIOBase):
    """The current member's content, as a readable stream."""

    def __init__(self, reader: TarReader) -> None:
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._reader.readinto(memoryview(buffer).cast("B"))


def open_source(path: str, stream_options: ReadOptions, stdin: BinaryIO | None = None) -> Source:
    """A source for `path`: a tar file, an OCI layout directory, or "-" (read once).

    A whole archive compressed with gzip, zstd, xz or bzip2 (as `guix pack -f
    docker` and nixpkgs write them, and as `docker load` reads them) is read
    once as it inflates, like a stream.
    """
    if path == "-":
        stream = stdin or _stdin()
        if _is_terminal(stream):  # nothing would ever come: say so instead of waiting
            raise InputError(
                "standard input is a terminal, not an archive: pipe one in "
                "(docker save app | guix-image inspect -)"
            )
        return _stream_source(stream, "<stdin>", stream_options)
    if os.path.isdir(path):
        return DirectorySource(path)
    if not os.path.exists(path):
        raise InputError(_missing(path))
    try:
        with open(path, "rb") as stream:
            if not os.path.isfile(path):  # a FIFO, or /dev/fd/N from <(...): read it once
                return _stream_source(stream, path, stream_options)
            head = stream.read(BLOCK)
            refuse_non_archive(head, path)
            compression = detect_compression(head)
            if compression == "none":
                return TarSource(path)
            stream.seek(0)
            inflated = inflate(stream, compression, path, os.fstat(stream.fileno()).st_size)
            return StreamSource(inflated, path, stream_options, compression)
    except OSError as error:
        raise InputError(f"{path}: {error.strerror}") from None


def _stream_source(stream: BinaryIO, name: str, options: ReadOptions) -> StreamSource:
    stream, compression = peek_compression(stream)
    if compression == "none":
        refuse_non_archive(_head(stream), name)
        return StreamSource(stream, name, options)
    return StreamSource(inflate(stream, compression, name, None), name, options, compression)


def _head(stream: BinaryIO) -> bytes:
    """The first block of a stream, which stays where it is."""
    if stream.seekable():
        head = stream.read(BLOCK)
        stream.seek(-len(head), io.SEEK_CUR)
        return head
    return cast(io.BufferedReader, stream).peek(BLOCK)[:BLOCK]


def refuse_non_archive(head: bytes, name: str) -> None:
    """Say what a file is when it is plainly not an image archive."""
    text = head.lstrip(b" \t\r\n")
    if text[:1] in (b"{", b"["):
        raise InputError(
            f"{name} is JSON, not an image archive (a build config? use `guix-image build`)"
        )
    if not head:
        raise InputError(f"{name} is empty, not an image archive")


def _missing(path: str) -> str:
    """No such file: perhaps the user named an image as docker or podman would."""
    looks_like_a_name = ":" in path or ("/" not in path and "." not in path)
    if looks_like_a_name and not path.startswith(("/", ".")):
        return (
            f"{path} is not a file; for an image in Docker use "
            f"`docker save {path} | guix-image inspect -`"
        )
    return f"{path}: no such file or directory"


TRANSPORTS = ("docker-archive:", "oci-archive:", "oci:")


def parse_reference(text: str) -> tuple[str, str | None]:
    """A path, and the image it names if any, from what users give skopeo:
    `docker-archive:FILE[:name:tag]`, `oci-archive:FILE[:tag]`, `oci:DIR[:tag]`,
    or a plain path (one that exists is always a plain path)."""
    if os.path.lexists(text):
        return text, None
    for transport in TRANSPORTS:
        if text.startswith(transport):
            path, _, choice = text[len(transport) :].partition(":")
            return path, choice or None
    return text, None


def layer_name(source: str, index: int, location: str) -> str:
    """How messages name a layer: "app.tar: layer 2 (002/layer.tar)"."""
    return f"{source}: layer {index} ({location})"


def _check_limit(size: int, limit: int, what: str, where: str) -> None:
    if size > limit:
        raise ArchiveError(f"{where}: {what} is {size} bytes, over the {limit}-byte limit")


def _members(reader: TarReader, name: str, index: dict[str, TarMember]) -> Any:
    """Iterate members, adding each to `index`; refuse climbing names and duplicates."""
    for count, member in enumerate(reader, 1):
        if count > MAX_MEMBERS:
            raise ArchiveError(f"{name}: more than {MAX_MEMBERS} members; not an image archive")
        if is_climbing(member.name.lstrip("/")):
            raise ArchiveError(f"{name}: member name {member.name!r} climbs out of the archive")
        key = normalise_member_name(member.name)
        if key in index:
            raise ArchiveError(
                f"{name}: duplicate member {member.name!r} (also {index[key].name!r}); "
                "loaders disagree on which one counts"
            )
        if (
            member.type == LNKTYPE
            and not is_climbing(member.linkname.lstrip("/"))  # refused as escaping, when used
            and normalise_member_name(member.linkname) not in index
        ):
            raise ArchiveError(
                f"{name}: member {member.name!r} is a hard link to {member.linkname!r}, "
                "which does not come before it; loaders cannot extract it"
            )
        index[key] = member
        yield member


def _index(reader: TarReader, name: str) -> dict[str, TarMember]:
    members: dict[str, TarMember] = {}
    for _ in _members(reader, name, members):
        pass
    return members


def _resolve(members: dict[str, TarMember], location: str, what: str, where: str) -> TarMember:
    """The regular-file member `location` refers to, following links inside the archive."""
    if is_climbing(location.lstrip("/")):
        raise ArchiveError(f"{where}: {what} {location!r} climbs out of the archive")
    key = normalise_member_name(location)
    for _ in range(MAX_LINK_HOPS):
        member = members.get(key)
        if member is None:
            raise ArchiveError(f"{where}: {what} {location!r} is not in the archive")
        if member.type == REGTYPE:
            return member
        if member.type not in (SYMTYPE, LNKTYPE):
            raise ArchiveError(f"{where}: {what} {location!r} is a {member.type_name}, not a file")
        if location.rsplit("/", 1)[-1] in ("manifest.json", "index.json", "oci-layout"):
            raise ArchiveError(f"{where}: {what} is a link; refusing to follow it")
        target = member.linkname
        if member.type == SYMTYPE and not target.startswith("/"):
            target = key.rsplit("/", 1)[0] + "/" + target if "/" in key else target
        if is_climbing(target.lstrip("/")):
            raise ArchiveError(f"{where}: {what} {location!r} is a link that escapes the archive")
        key = normalise_member_name(target)
    raise ArchiveError(f"{where}: {what} {location!r} is a link that loops")


_METADATA_NAMES = {"oci-layout", "repositories", "manifest.json", "index.json"}


def _looks_like_metadata(key: str, data: bytes) -> bool:
    """Known metadata names, or anything that parses as JSON (a tar never does)."""
    if key in _METADATA_NAMES:
        return True
    if data.lstrip()[:1] not in (b"{", b"["):
        return False
    try:
        strict_json.loads(data)
    except strict_json.JSONRefused:
        return False
    return True


def _is_terminal(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _stdin() -> BinaryIO:
    import sys

    return sys.stdin.buffer
