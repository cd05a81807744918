"""A build's OCI output: each layer becomes a blob, compressed, in an OCI layout
(`oci-dir`) or in one tar of it (`oci-archive`).

Each layer's tar is streamed once through a `HashingWriter` (its diff_id)
into a `BlobWriter` (compression.py: the blob and its digest), so both
digests come from one pass; the blob is written beside its place in a
`BlobStore` and renamed to its digest. A blob's size is only known once it
is written, and an archive's tar header needs it first: so an `oci-archive`
is assembled in a blob store on disk (the layer cache's, or a temporary
directory), then streamed, its memory bounded whatever the layers' sizes.

With the layer cache, compressed blobs are kept in the cache's blob store
under their digest, and each store layer's entry records the digest of its
blob for each compressor (`Compression.label`). A rebuild then compresses
nothing: it checks the kept blob's bytes against its digest, streams the
layer's tar only to confirm its diff_id, and uses the kept blob.

A base image's layers that are gzip or zstd blobs stay as they are (the same
blob, the same digest): they are copied, and their tars inflated only to
confirm their diff_ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import OperationError
from ..fastpath import HashingWriter
from ..formats import oci_layout
from ..formats.compression import (
    ANNOTATION,
    MEDIA_TYPES,
    BlobWriter,
    Compression,
    choose,
    parse_label,
)
from ..formats.docker_archive import DOCKER_MANIFEST
from ..formats.oci_layout import (
    OCI_CONFIG,
    OCI_MANIFEST,
    ArchivedBlob,
    BlobStore,
    Descriptor,
    LayoutWriter,
)
from ..formats.stored_layer import StoredLayer
from ..model import SHA256_PREFIX, Layer, Measured, PendingDigest, Progress, canonical_json

OCI_FORMATS = ("oci-archive", "oci-dir")
_KEPT_COMPRESSIONS = ("gzip", "zstd")  # a base image's blobs kept as they are


@dataclass(frozen=True)
class LayerBlob:
    """A layer as its blob: digest, size, media type, and what compressed it."""

    digest: str
    size: int
    media_type: str
    label: str | None  # Compression.label, None for a blob kept from a base image

    def descriptor(self) -> Descriptor:
        annotations = {ANNOTATION: self.label} if self.label and self.label != "none" else None
        return Descriptor(self.media_type, self.digest, self.size, annotations)


@dataclass
class _Done:
    """A digest already final (each OCI layer is drained before the next)."""

    measured: Measured

    def result(self) -> Measured:
        return self.measured


class OciOutput:
    """Where and how a build writes OCI: `target` is the layout directory
    (oci-dir), or a file descriptor or function taking bytes (oci-archive)."""

    sizes_first = False  # no tar header precedes a layer blob: its size is not needed first

    def __init__(
        self,
        kind: str,
        target: str | int | Callable[[bytes], object],
        compression: Compression,
        *,
        kept_blobs: BlobStore | None = None,
        mtime: int = 0,
    ) -> None:
        self.kind = kind
        self.target = target
        self.compression = compression
        # The layer cache's blob store: compressed blobs are made there (and
        # found there by a rebuild), never uncompressed ones.
        self.kept_blobs = kept_blobs if compression.method != "none" else None
        self.mtime = mtime

    @contextlib.contextmanager
    def open(
        self, idle: Callable[[], bool], checkpoint_interval: int | None
    ) -> Iterator[OciWriter]:
        layout = None
        if self.kind == "oci-dir":
            assert isinstance(self.target, str)
            created = not os.path.exists(self.target)
            layout = LayoutWriter(self.target)
        try:
            with self._store(layout) as store:
                yield OciWriter(self, store, layout, idle, checkpoint_interval)
        except BaseException:
            if layout is not None and created:  # nothing half-written is left
                shutil.rmtree(layout.root, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def _store(self, layout: LayoutWriter | None) -> Iterator[BlobStore]:
        """Where blobs are made: the cache's store, else the layout, else a
        temporary directory (an archive's), removed at the end."""
        with contextlib.ExitStack() as stack:
            if self.kept_blobs is not None:
                self.kept_blobs.create()
                store = self.kept_blobs
            elif layout is not None:
                store = layout
            else:
                import tempfile

                scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="guix-image-"))
                store = BlobStore(scratch)
                store.create()
            yield store


class OciWriter:
    """Adds layers as blobs, then the config, manifest and index (see OciOutput)."""

    sizes_first = False

    def __init__(
        self,
        output: OciOutput,
        store: BlobStore,
        layout: LayoutWriter | None,
        idle: Callable[[], bool],
        checkpoint_interval: int | None,
    ) -> None:
        self._output = output
        self._compression = output.compression
        # Made at the first layer compressed (a rebuild may compress none).
        self._compressors: Callable[[], Any] | None = None
        self._store = store
        self._layout = layout
        self._idle = idle
        self._interval = checkpoint_interval
        self.blobs: list[LayerBlob] = []
        # By position, blobs this build compressed: (label, digest, size).
        self.new_blobs: dict[int, tuple[str, str, int]] = {}
        self.manifest: Descriptor | None = None
        self.manifest_digest: str | None = None
        self.bytes_written = 0
        self.forked = False

    def add_layer(self, layer: Layer, progress: Progress) -> PendingDigest:
        """Stream one layer into its blob; its digests are final on return."""
        position = len(self.blobs)
        if isinstance(layer, StoredLayer) and layer.compression() in _KEPT_COMPRESSIONS:
            blob, measured = self._keep(layer, progress)
        else:
            blob, measured = self._reuse(layer, progress) or self._compress(layer, progress)
            if blob.label is not None and blob.label != "none":
                self.new_blobs[position] = (blob.label, blob.digest, blob.size)
        self.blobs.append(blob)
        return _Done(measured)

    def drain(self) -> None:
        pass  # each layer was drained as it was added

    def finish(self, config: bytes, repo_tags: list[str]) -> str:
        """Write the config, the manifest and the index; the image id."""
        self._compressors = None  # zstd's workers stop
        config_digest = self._store.put(config)
        config_descriptor = Descriptor(OCI_CONFIG, config_digest, len(config))
        manifest = oci_layout.manifest_document(
            config_descriptor, [blob.descriptor() for blob in self.blobs]
        )
        manifest_digest = self._store.put(manifest)
        self.manifest = Descriptor(OCI_MANIFEST, manifest_digest, len(manifest))
        self.manifest_digest = manifest_digest
        if self._layout is not None:
            self._finish_layout(self._layout, config_descriptor, repo_tags)
        else:
            self._finish_archive(config, manifest, config_descriptor, repo_tags)
        return config_digest

    # -- layers ------------------------------------------------------------------

    def _compress(self, layer: Layer, progress: Progress) -> tuple[LayerBlob, Measured]:
        compression = self._compression
        with self._store.new_blob() as (fd, temporary):
            if self._compressors is None and compression.method != "none":
                self._compressors = compression.compressors()
            writer = BlobWriter(fd, compression, self._compressors)
            measured = self._stream(layer, writer, progress)
            blob = writer.finish()
            if compression.method == "none":
                blob = Measured(measured.digest, measured.size)  # the tar is the blob
            self._store.commit(temporary, blob.digest)
        made = LayerBlob(blob.digest, blob.size, compression.media_type, compression.label)
        return made, measured

    def _reuse(self, layer: Layer, progress: Progress) -> tuple[LayerBlob, Measured] | None:
        """The blob an earlier build made of this layer, if it is kept and intact:
        the tar is still streamed, only to confirm the diff_id."""
        store = self._output.kept_blobs
        known = layer.known_blob(self._compression.label)
        if store is None or known is None:
            return None
        digest, size = known
        if not store.has(digest, size) or _file_digest(store.path(digest)) != digest:
            with contextlib.suppress(OSError):
                os.unlink(store.path(digest))  # damaged: made again
            return None
        measured = self._stream(layer, _discard, progress)
        compression = self._compression
        return LayerBlob(digest, size, compression.media_type, compression.label), measured

    def _keep(self, layer: StoredLayer, progress: Progress) -> tuple[LayerBlob, Measured]:
        """A base image's compressed blob, as it is; its tar's digest confirmed."""
        with self._store.new_blob() as (fd, temporary):
            digest = hashlib.sha256()
            size = 0
            with layer.open_blob() as blob:
                while chunk := blob.read(1 << 20):
                    digest.update(chunk)
                    oci_layout._write_all(fd, chunk)
                    size += len(chunk)
            found = SHA256_PREFIX + digest.hexdigest()
            if layer.digest is not None and layer.digest != found:
                raise OperationError(
                    f"{layer.description}: its blob has digest {found}, not {layer.digest}"
                )
            self._store.commit(temporary, found)
        measured = self._stream(layer, _discard, progress)
        return LayerBlob(found, size, MEDIA_TYPES[layer.compression()], None), measured

    def _stream(
        self, layer: Layer, sink: Callable[[memoryview], object], progress: Progress
    ) -> Measured:
        with HashingWriter(
            sink, idle=self._idle, fork=False, checkpoint_interval=self._interval
        ) as out:
            pending = layer.stream(out, progress)
            out.drain()
        return pending.result()

    # -- the image -----------------------------------------------------------------

    def _finish_layout(
        self, layout: LayoutWriter, config: Descriptor, repo_tags: list[str]
    ) -> None:
        assert self.manifest is not None
        descriptors = [config, self.manifest, *(b.descriptor() for b in self.blobs)]
        for descriptor in descriptors:
            layout.adopt(self._store.path(descriptor.digest), descriptor.digest, descriptor.size)
        layout.add_image(self.manifest, repo_tags)
        self.bytes_written = sum(d.size for d in {d.digest: d for d in descriptors}.values())

    def _finish_archive(
        self, config: bytes, manifest: bytes, config_descriptor: Descriptor, repo_tags: list[str]
    ) -> None:
        assert self.manifest is not None
        index = oci_layout.index_document(self.manifest, repo_tags)
        blob_name = "blobs/sha256/{}".format
        # Docker's manifest.json beside the index, as `docker save` (25+) writes
        # it: the archive then loads with `docker load` too, of any version;
        # not with zstd layers, which Docker before 23 cannot read.
        docker_manifest = [
            {
                "Config": blob_name(config_descriptor.digest.removeprefix(SHA256_PREFIX)),
                "RepoTags": repo_tags,
                "Layers": [blob_name(b.digest.removeprefix(SHA256_PREFIX)) for b in self.blobs],
            }
        ]
        documents = [("oci-layout", oci_layout.LAYOUT_FILE), ("index.json", index)]
        if not any(blob.media_type == MEDIA_TYPES["zstd"] for blob in self.blobs):
            documents.append((DOCKER_MANIFEST, canonical_json(docker_manifest)))
        documents += [
            (blob_name(self.manifest.digest.removeprefix(SHA256_PREFIX)), manifest),
            (blob_name(config_descriptor.digest.removeprefix(SHA256_PREFIX)), config),
        ]
        unique = {b.digest: b for b in self.blobs}.values()  # a blob is stored once
        blobs = [ArchivedBlob(b.digest, b.size, self._store.path(b.digest)) for b in unique]
        target = self._output.target
        assert not isinstance(target, str)
        self.bytes_written = oci_layout.write_archive(
            target, documents, blobs, mtime=self._output.mtime
        )


def compression_of(layers: list[StoredLayer]) -> Compression:
    """How an image's own layers were compressed: as the last of them that a
    build recorded, else as their media type says, at the default level."""
    for layer in reversed(layers):
        recorded = parse_label(layer.compressed_by or "")
        if recorded is not None:
            return recorded
    kinds = [layer.claimed_compression() for layer in layers]
    method = next((kind for kind in reversed(kinds) if kind in ("gzip", "zstd")), "none")
    return choose(method)


def _discard(block: memoryview) -> None:
    """The sink of a tar streamed only for its digest."""


def _file_digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return SHA256_PREFIX + digest.hexdigest()
