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
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import InputError, OperationError
from ..fastpath import HashingWriter, Sink, share_heap_arenas
from ..files import write_all
from ..formats import oci_layout
from ..formats.compression import (
    ANNOTATION,
    MEDIA_TYPES,
    BlobWriter,
    Compression,
    PieceWorkers,
    choose,
    parse_label,
)
from ..formats.docker_archive import DOCKER_MANIFEST
from ..formats.oci_layout import (
    OCI_CONFIG,
    OCI_MANIFEST,
    ArchivedBlob,
    BlobMismatch,
    BlobStore,
    Descriptor,
    LayoutWriter,
)
from ..formats.stored_layer import StoredLayer
from ..formats.streams import SliceReader
from ..model import SHA256_PREFIX, Layer, Measured, PendingDigest, Progress, canonical_json
from .store_layer import StaleCacheEntry

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


@dataclass
class _Finished:
    """An image whose blobs are all in the store: its manifest and what it names."""

    manifest: Descriptor
    blobs: list[Descriptor]  # the config's and the layers'
    platform: dict[str, str]


class OciOutput:
    """Where and how a build writes OCI: `target` is the layout directory
    (oci-dir), or a file descriptor or function taking bytes (oci-archive).

    One build writes one image. Within `several()`, each build adds an image
    for its platform, and at the end one image index lists them all.
    """

    def __init__(
        self,
        kind: str,
        target: str | Sink,
        compression: Compression,
        *,
        kept_blobs: BlobStore | None = None,
        mtime: int = 0,
        trust_cache: bool = False,
    ) -> None:
        self.kind = kind
        self.target = target
        self.compression = compression
        # The layer cache's blob store: compressed blobs are made there (and
        # found there by a rebuild), never uncompressed ones.
        self.kept_blobs = kept_blobs if compression.method != "none" else None
        self.mtime = mtime
        # Take a kept blob's layer as the cache recorded it, without streaming
        # its tar to confirm its diff_id (for a push: see cli/push.py).
        self.trust_cache = trust_cache
        self.bytes_written = 0
        self.index_digest: str | None = None  # that of the image index, for several images
        self._store: BlobStore | None = None
        self._layout: LayoutWriter | None = None
        self._finished: list[_Finished] = []
        self._several = False
        # The blobs made by this output's builds, which need no checking again.
        self._made: set[str] = set()

    @contextlib.contextmanager
    def open(
        self, idle: Callable[[], bool], checkpoint_interval: int | None
    ) -> Iterator[OciWriter]:
        """A writer for one image, published as it finishes unless within `several`."""
        if self._store is not None:
            with OciWriter(self, self._store, idle, checkpoint_interval) as writer:
                yield writer
            return
        with (
            self._session(),
            OciWriter(self, self._store_now(), idle, checkpoint_interval) as writer,
        ):
            yield writer

    @contextlib.contextmanager
    def several(self, names: list[str]) -> Iterator[None]:
        """Build several images (one per platform) within; at the end, publish one
        image index of them under `names`."""
        self._several = True
        with self._session():
            yield
            self.publish(names)

    def _store_now(self) -> BlobStore:
        assert self._store is not None
        return self._store

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """The blob store for the images to come: the cache's, else the layout,
        else a temporary directory (an archive's), removed at the end. A layout
        this session created is removed if it fails: nothing half-written is left."""
        created = False
        if self.kind == "oci-dir":
            assert isinstance(self.target, str)
            created = oci_layout.is_empty(self.target)
            self._layout = LayoutWriter(self.target)
        try:
            with contextlib.ExitStack() as stack:
                if self.kept_blobs is not None:
                    try:
                        self.kept_blobs.create()
                    except InputError:  # an unwritable cache: build without it
                        self.kept_blobs = None
                if self.kept_blobs is not None:
                    self._store = self.kept_blobs
                elif self._layout is not None:
                    self._store = self._layout
                else:
                    import tempfile

                    prefix = "guix-image-"
                    scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix))
                    self._store = BlobStore(scratch)
                    self._store.create()
                yield
        except BaseException:
            # Only a layout no build has listed an image in yet (another may be
            # writing into the same new directory, and will list its own).
            listed = self._layout is not None and os.path.exists(
                os.path.join(self._layout.root, "index.json")
            )
            if self._layout is not None and created and not listed:
                shutil.rmtree(self._layout.root, ignore_errors=True)
            raise
        finally:
            self._store = None

    def finished(self, image: _Finished, made: set[str], repo_tags: list[str]) -> None:
        """An image's blobs are stored (`made`: those its build made): publish it,
        unless more are to come."""
        self._finished.append(image)
        self._made |= made
        if not self._several:
            self.publish(repo_tags)

    def publish(self, names: list[str]) -> None:
        """List what was built under `names`: in the layout's index.json, or as
        an archive streamed to the target."""
        store = self._store_now()
        blobs = [d for image in self._finished for d in (image.manifest, *image.blobs)]
        if self._several:
            manifests = [
                {**image.manifest.to_json(), "platform": image.platform} for image in self._finished
            ]
            index = canonical_json(
                {"schemaVersion": 2, "mediaType": oci_layout.OCI_INDEX, "manifests": manifests}
            )
            top = Descriptor(oci_layout.OCI_INDEX, store.put(index), len(index))
            self.index_digest = top.digest
            blobs.insert(0, top)
        else:
            top = self._finished[0].manifest
        unique = list({d.digest: d for d in blobs}.values())  # a blob is stored once
        self.bytes_written = sum(d.size for d in unique)
        if self._layout is not None:
            for descriptor in unique:
                self._layout.adopt(
                    store.path(descriptor.digest), descriptor.digest, descriptor.size
                )
            self._layout.add_image(top, names)
            return
        documents = [
            ("oci-layout", oci_layout.LAYOUT_FILE),
            ("index.json", oci_layout.index_document(top, names)),
        ]
        docker_manifest = self._docker_manifest(names)
        if docker_manifest is not None:
            documents.append((DOCKER_MANIFEST, docker_manifest))
        archived = [
            ArchivedBlob(d.digest, d.size, store.path(d.digest), d.digest not in self._made)
            for d in unique
        ]
        assert not isinstance(self.target, str)
        try:
            # Its pipeline hashes the blobs to check while it writes (see fastpath).
            with HashingWriter(self.target, blocks=4) as out:
                checked = oci_layout.write_archive(out, documents, archived, mtime=self.mtime)
                out.drain()
                oci_layout.check_blobs(checked)
            self.bytes_written = out.position
        except BlobMismatch as error:
            if self.kept_blobs is None:
                raise
            with contextlib.suppress(OSError):
                os.unlink(error.path)  # a kept blob was damaged: the next build makes it again
            raise StaleCacheEntry(
                f"{error}; it is removed from the layer cache: run the build again, "
                "or build with --no-cache"
            ) from None

    def _docker_manifest(self, names: list[str]) -> bytes | None:
        """Docker's manifest.json, to put beside the index as `docker save` (25+)
        does: the archive then loads with `docker load` too, of any version. Not
        for several images, nor zstd layers, which Docker before 23 cannot read."""
        if len(self._finished) != 1:
            return None
        image = self._finished[0]
        config, *layers = image.blobs
        if any(layer.media_type == MEDIA_TYPES["zstd"] for layer in layers):
            return None
        name = "blobs/sha256/{}".format
        entry = {
            "Config": name(config.digest.removeprefix(SHA256_PREFIX)),
            "RepoTags": names,
            "Layers": [name(layer.digest.removeprefix(SHA256_PREFIX)) for layer in layers],
        }
        return canonical_json([entry])


class OciWriter:
    """Adds layers as blobs, then the config and manifest (see OciOutput)."""

    sizes_first = False  # no tar header precedes a layer blob: its size is not needed first

    def __init__(
        self,
        output: OciOutput,
        store: BlobStore,
        idle: Callable[[], bool],
        checkpoint_interval: int | None,
    ) -> None:
        self._output = output
        self._compression = output.compression
        # Made at the first layer compressed (a rebuild may compress none).
        self._compressors: PieceWorkers | None = None
        self._store = store
        self._idle = idle
        self._interval = checkpoint_interval
        self.blobs: list[LayerBlob] = []
        # By position, blobs this build compressed: (label, digest, size).
        self.new_blobs: dict[int, tuple[str, str, int]] = {}
        self.manifest_digest: str | None = None
        self.forked = False
        self._made: set[str] = set()  # blobs written by this build (not reused)
        # Tars streamed only for their digests share one pipeline to /dev/null
        # (a forked one where it can be): one fork, not one per layer.
        self._stack = contextlib.ExitStack()
        self._null: HashingWriter | None = None

    def __enter__(self) -> OciWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)  # type: ignore[arg-type]

    @property
    def bytes_written(self) -> int:
        return self._output.bytes_written

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
        """Store the config and the manifest, and hand the image to the output;
        the image id."""
        config_descriptor = Descriptor(OCI_CONFIG, self._store.put(config), len(config))
        layers = [blob.descriptor() for blob in self.blobs]
        manifest = oci_layout.manifest_document(config_descriptor, layers)
        manifest_descriptor = Descriptor(OCI_MANIFEST, self._store.put(manifest), len(manifest))
        self.manifest_digest = manifest_descriptor.digest
        document = json.loads(config)
        platform = {
            key: document[key] for key in ("architecture", "os", "variant") if key in document
        }
        finished = _Finished(manifest_descriptor, [config_descriptor, *layers], platform)
        self._stack.close()  # the pipeline for digests only stops: the archive may fork its own
        self._output.finished(finished, self._made, repo_tags)  # small blobs: checked anyway
        return config_descriptor.digest

    # -- layers ------------------------------------------------------------------

    def _compress(self, layer: Layer, progress: Progress) -> tuple[LayerBlob, Measured]:
        compression = self._compression
        with self._store.new_blob() as (fd, temporary):
            if compression.method == "none":  # the tar is the blob: one digest for both
                measured = self._stream(layer, fd, progress)
                blob = measured
            else:
                if self._compressors is None:  # the workers stop with the writer
                    share_heap_arenas()  # before they start: see there
                    self._compressors = self._stack.enter_context(compression.compressors())
                writer = BlobWriter(fd, compression, self._compressors)
                measured = self._stream(layer, writer, progress)
                blob = writer.finish()
            self._store.commit(temporary, blob.digest)
        self._made.add(blob.digest)
        made = LayerBlob(blob.digest, blob.size, compression.media_type, compression.label)
        return made, measured

    def _reuse(self, layer: Layer, progress: Progress) -> tuple[LayerBlob, Measured] | None:
        """The blob an earlier build made of this layer, if it is kept: the tar is
        still streamed, only to confirm the diff_id (unless the cache is trusted).
        The blob's bytes are checked as an archive copies them; into a layout,
        before it is linked there (unless trusted: a push, whose registry checks them)."""
        store = self._output.kept_blobs
        known = layer.known_blob(self._compression.label)
        if store is None or known is None:
            return None
        digest, size = known
        if not store.has(digest, size):
            return None
        trusted = self._output.trust_cache
        if (
            self._output.kind == "oci-dir"
            and not trusted  # a push: the registry checks the bytes of what is uploaded
            and _file_digest(store.path(digest), size) != digest
        ):
            with contextlib.suppress(OSError):
                os.unlink(store.path(digest))  # damaged: made again
            return None
        store.touch(digest)  # recently used: trimmed last
        predicted = layer.predicted() if trusted else None
        measured = predicted or self._stream(layer, None, progress)
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
                    write_all(fd, memoryview(chunk))
                    size += len(chunk)
            found = SHA256_PREFIX + digest.hexdigest()
            if layer.digest is not None and layer.digest != found:
                raise OperationError(
                    f"{layer.description}: its blob has digest {found}, not {layer.digest}"
                )
            self._store.commit(temporary, found)
        self._made.add(found)
        measured = self._stream(layer, None, progress)
        media_type = MEDIA_TYPES[layer.compression()]
        return LayerBlob(found, size, media_type, layer.compressed_by), measured

    def _stream(self, layer: Layer, sink: Sink | None, progress: Progress) -> Measured:
        """Stream the layer's tar to `sink`, or only for its digest (None)."""
        if sink is None:
            out = self._null_writer()
            pending = layer.stream(out, progress)
            out.drain()
            return pending.result()
        with HashingWriter(
            sink, idle=self._idle, fork=False, blocks=4, checkpoint_interval=self._interval
        ) as out:
            pending = layer.stream(out, progress)
            out.drain()
        return pending.result()

    def _null_writer(self) -> HashingWriter:
        if self._null is None:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            self._stack.callback(os.close, null)
            self._null = self._stack.enter_context(
                HashingWriter(null, idle=self._idle, checkpoint_interval=self._interval)
            )
        return self._null


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


def _file_digest(path: str, size: int) -> str | None:
    """The digest of the `size` bytes of the file at `path`; None if unreadable."""
    try:
        with SliceReader(open(path, "rb"), 0, size) as blob:
            return blob.digest()[0]
    except OSError:
        return None
