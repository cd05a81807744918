"""Layers as archives store them: what the readers produce, ready for a writer.

A `StoredLayer` is a blob of an archive (a Docker archive member or an OCI
layout blob) with what the archive states of it: its diff_id, its digest
and media type (OCI), its size. The readers look inside it (`read`), and a
build that takes the image as its base writes it out again (`write_tar`):
an uncompressed blob stored verbatim in a file is copied by offset, any
other is inflated, and either way hashed and checked against its diff_id.
A `TarFileLayer` is a layer tar in a file of its own (a customisation layer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from ..errors import FileChanged, InputError
from ..files import open_regular
from ..model import Layer, Progress, TarSink
from ..spill import Scratch
from ..tar.reader import TarReader
from .layer_tar import LayerContents, ReadOptions
from .sources import Source
from .streams import detect_compression, open_layer

# OCI (application/vnd.oci.image.layer.v1.tar[+gzip|+zstd], and the
# nondistributable ones) and Docker (application/vnd.docker.image.rootfs.diff.tar[.gzip]).
_MEDIA_TYPE_COMPRESSION = (
    (".tar+gzip", "gzip"),
    (".tar+zstd", "zstd"),
    (".tar.gzip", "gzip"),
    (".tar.zstd", "zstd"),
    (".tar", "none"),
)


class Claim(NamedTuple):
    """Something an archive says of a layer (`claimed`), and what its bytes are."""

    what: str
    claimed: str | None
    found: str | None

    @property
    def holds(self) -> bool:
        return self.claimed == self.found


class StoredLayer(Layer):
    """Layer `index` (from 1) of an image in `source`: the blob at `location`."""

    def __init__(
        self,
        source: Source,
        index: int,
        location: str,
        size: int,
        *,
        diff_id: str | None,
        digest: str | None = None,
        media_type: str | None = None,
        declared_size: int | None = None,
        compressed_by: str | None = None,
    ) -> None:
        self.source, self.index, self.location = source, index, location
        self.declared_size = declared_size  # what an OCI descriptor says the size is
        self.size: int = size  # bytes as stored
        self.diff_id, self.digest, self.media_type = diff_id, digest, media_type
        # What compressed the blob, as a guix-image build records it (an annotation).
        self.compressed_by = compressed_by
        self.description = f"{source.name}: layer {index} ({location})"
        self._compression: str | None = None
        self._tar_size: int | None = None

    def digest_claims(self, read: LayerContents) -> list[Claim]:
        """The digests the archive claims for this layer, beside those of its bytes."""
        claims = [Claim("diff_id", self.diff_id, read.diff_id)]
        if self.digest is not None:
            claims.append(Claim("blob digest", self.digest, read.blob_digest))
        return claims

    def compression_claim(self, read: LayerContents) -> Claim | None:
        """The compression its media type names ("none", "gzip", "zstd"), if it has
        one that names a layer, beside what its bytes are."""
        claimed = self.claimed_compression()
        return None if claimed is None else Claim("compression", claimed, read.compression)

    def claimed_compression(self) -> str | None:
        """The compression its media type names ("none", "gzip", "zstd"), if any."""
        media_type = self.media_type or ""
        for suffix, compression in _MEDIA_TYPE_COMPRESSION:
            if media_type.endswith(suffix):
                return compression
        return None

    def read(self, options: ReadOptions, scratch: Scratch | None = None) -> LayerContents:
        """What is inside: digests, entries, as much as `options` asks for; its
        entries' rows spill to `scratch` (a file of their own by default)."""
        return self.source.read_layer(self.location, self.index, self.size, options, scratch)

    def open_blob(self) -> BinaryIO:
        """The blob's bytes as stored (not for a stream read once)."""
        return self.source.open_blob(self.location)

    def tar_size(self) -> int:
        if self._tar_size is None:
            extent = self._verbatim()
            self._tar_size = extent[2] if extent else sum(map(len, self._inflated()))
        return self._tar_size

    def write_tar(self, out: TarSink, progress: Progress) -> None:
        extent = self._verbatim()
        if extent is not None:
            copy_extent(out, *extent)
            progress(extent[2])
            return
        expected = self.tar_size()
        written = 0
        for chunk in self._inflated():
            written += len(chunk)
            if written > expected:
                break
            out.write(chunk)
            progress(written)
        if written != expected:
            raise FileChanged(f"{self.description}: the layer changed while it was being read")

    def compression(self) -> str:
        """The blob's compression, from its first bytes: "none", "gzip", "zstd", ..."""
        if self._compression is None:
            with self.open_blob() as blob:
                self._compression = detect_compression(blob.read(8))
        return self._compression

    def _verbatim(self) -> tuple[str, int, int] | None:
        """(file, offset, size) of the tar, if it is stored uncompressed in a file."""
        extent = self.source.extent(self.location)
        return extent if extent is not None and self.compression() == "none" else None

    @contextlib.contextmanager
    def tar_reader(self) -> Iterator[TarReader]:
        """Its members, uncompressed, read from the start of its blob."""
        with self.open_blob() as blob:
            data, _ = open_layer(blob, self.description, self.size)
            yield TarReader(data, name=self.description)

    def _inflated(self) -> Iterator[bytes]:
        with self.open_blob() as blob:
            data, _ = open_layer(blob, f"layer {self.index}", self.size)
            while chunk := data.read(1 << 20):
                yield chunk


class TarFileLayer(Layer):
    """An uncompressed layer tar of `size` bytes in the file at `path`."""

    def __init__(
        self, path: str, size: int, *, description: str, comment: str, diff_id: str | None
    ) -> None:
        self.path = path
        self.size: int = size
        self.description, self.comment, self.diff_id = description, comment, diff_id

    def tar_size(self) -> int:
        return self.size

    def write_tar(self, out: TarSink, progress: Progress) -> None:
        copy_extent(out, self.path, 0, self.size)
        progress(self.size)


def copy_extent(out: TarSink, path: str, offset: int, size: int) -> None:
    """Copy `size` bytes of the file at `path` from `offset` (more may follow them)."""
    try:
        fd = open_regular(path)
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        out.copy_from_fd(fd, size, path, at_eof=False)
    finally:
        os.close(fd)
