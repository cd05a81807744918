"""Push an image, as the readers give it, to a registry: blobs, then the manifest.

Each blob is asked for first (HEAD) and uploaded only if the registry lacks
it, mounted from `mount_from` when that repository has it; blobs go up in
parallel (`PARALLEL` at a time). The manifest goes last, so a push that
fails never leaves a tag naming a blob the registry lacks. An OCI image is
pushed with its own manifest, byte for byte (the same digest as in the
archive); an image from a Docker archive gets an OCI manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import InputError
from ..formats.compression import MEDIA_TYPES
from ..formats.oci_layout import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    manifest_document,
    replace_file,
)
from ..formats.stored_layer import StoredLayer
from ..formats.streams import SliceReader
from ..model import Image, sha256_digest
from .remote import BlobSource, Repository

PARALLEL = 4


@dataclass
class PushReport:
    """What a push did: the manifest's digest, and each blob's fate."""

    reference: str
    digest: str = ""
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)

    @property
    def pinned(self) -> str:
        """`host/name:tag@sha256:...`, what to pull to get exactly this image."""
        if self.reference.endswith(self.digest):
            return self.reference  # pushed by digest
        return f"{self.reference}@{self.digest}"


def push_image(
    image: Image[StoredLayer],
    repository: Repository,
    *,
    mount_from: str | None = None,
    memory: PushMemory | None = None,
    on_blob: Callable[[str, int, str], None] | None = None,
) -> PushReport:
    """Push `image`; `on_blob(digest, size, what happened)` hears of each blob
    as it is done (from the uploading threads). A blob the registry lacks is
    mounted from `mount_from`, else from where `memory` says it was pushed
    before, if the registry still has it there."""
    report = PushReport(str(repository.reference))
    manifest, media_type = _manifest(image)
    report.digest = sha256_digest(manifest)
    wanted = repository.reference.digest
    if wanted is not None and wanted != report.digest:
        raise InputError(
            f"{repository.reference}: the image's manifest is {report.digest}, not that digest"
        )
    blobs = [BlobSource(image.config_digest, len(image.config_bytes), data=image.config_bytes)]
    blobs += [_blob(layer) for layer in image.layers]
    unique = list({blob.digest: blob for blob in blobs}.values())

    host, name = repository.reference.host, repository.name
    remembered = memory.sources(host, name) if memory is not None else {}

    def push_blob(blob: BlobSource) -> None:
        source = mount_from or remembered.get(blob.digest)
        if repository.blob_exists(blob.digest):
            fate, kept = "present", report.present
        elif source and repository.mount(blob.digest, source):
            fate, kept = "mounted", report.mounted
        else:
            repository.upload(blob)
            fate, kept = "uploaded", report.uploaded
        kept.append(blob.digest)
        if on_blob is not None:
            on_blob(blob.digest, blob.size, fate)

    pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="guix-image-push")
    try:
        for future in [pool.submit(push_blob, blob) for blob in unique]:
            future.result()
    except BaseException:
        # The first failure (or Ctrl-C) ends the push: the uploads under way
        # stop at their next chunk, those not begun never begin.
        repository.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    repository.put_manifest(repository.reference.target, media_type, manifest, report.digest)
    if memory is not None:
        memory.remember(host, name, [blob.digest for blob in unique])
    return report


class PushMemory:
    """Where blobs were pushed before, by registry: a JSON file of digest to
    repository (the last one each went to), so that a push to another
    repository of the same registry mounts them instead of uploading them.
    Housekeeping, never a reason to fail: an unreadable file is no memory."""

    LIMIT = 20_000  # digests remembered per registry, the latest kept

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, host: str) -> str:
        return os.path.join(self.directory, host.replace(":", "_").replace("/", "_") + ".json")

    def sources(self, host: str, repository: str) -> dict[str, str]:
        """Digest to another repository of `host` that had it, for mounts."""
        with contextlib.suppress(OSError, ValueError), open(self._path(host)) as f:
            known = json.load(f)
            if isinstance(known, dict):
                return {
                    digest: where
                    for digest, where in known.items()
                    if isinstance(where, str) and where != repository
                }
        return {}

    def remember(self, host: str, repository: str, digests: list[str]) -> None:
        known = self.sources(host, "")
        for digest in digests:
            known.pop(digest, None)
            known[digest] = repository  # the latest last
        kept = dict(list(known.items())[-self.LIMIT :])
        with contextlib.suppress(OSError):
            os.makedirs(self.directory, exist_ok=True)
            replace_file(self._path(host), json.dumps(kept).encode())


def _manifest(image: Image[StoredLayer]) -> tuple[bytes, str]:
    """The image's own manifest if it has one (OCI), else one made for it."""
    if image.manifest is not None and image.manifest_media_type is not None:
        return image.manifest, image.manifest_media_type
    config = Descriptor(OCI_CONFIG, image.config_digest, len(image.config_bytes))
    layers = []
    for layer in image.layers:
        blob = _blob(layer)
        layers.append(Descriptor(MEDIA_TYPES[_compression(layer)], blob.digest, blob.size))
    return manifest_document(config, layers), OCI_MANIFEST


def _compression(layer: StoredLayer) -> str:
    kind = layer.compression()
    if kind not in MEDIA_TYPES:
        raise InputError(
            f"{layer.description}: a {kind} layer has no OCI media type; rebuild it with "
            "`guix-image build --format oci-dir`"
        )
    return kind


def _blob(layer: StoredLayer) -> BlobSource:
    """Where the layer's blob is, and its digest: as claimed where an archive
    claims one (the registry checks it against the bytes), else hashed."""
    extent = layer.source.extent(layer.location)
    if extent is None:
        raise InputError(
            f"{layer.description}: push reads blobs from an archive file or a layout, "
            "not from a stream (decompress the archive, or give a file)"
        )
    path, offset, size = extent
    digest = layer.digest
    if digest is None and layer.compression() == "none":
        digest = layer.diff_id
    if digest is None:
        with SliceReader(open(path, "rb"), offset, size) as blob:
            digest, _ = blob.digest()
    return BlobSource(digest, size, path=path, offset=offset)
