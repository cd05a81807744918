"""`build`: turn a BuildConfig into an image archive streamed to a sink.

What can be checked cheaply is checked before the first byte is written:
the config, that store paths exist, the base image's structure, the
customisation layer's checksum. Then every layer is streamed once: its tar
header carries the size computed from the scan, and its digest is computed
on the way and checked against whatever we knew in advance. What only the
scan or the copy can find (a fifo deep in a store path, a file changing, a
base layer whose bytes do not match its diff_id) fails the build after
output has begun; with an output file, none is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .cache import CachedLayer, LayerCache, cache_key
from .config import BuildConfig
from .docker_archive import DockerArchiveWriter
from .errors import InputError
from .hashing_writer import Digest, HashingWriter, Sink
from .image import (
    SHA256_PREFIX,
    HistoryEntry,
    ImageConfig,
    ImageRecord,
    LayerRef,
    is_sha256_digest,
    merge_env,
)
from .layers import BlobLayer, InflatedLayer, Layer, StaleCacheEntry, StoreLayer
from .store import Store
from .tarwriter import HeaderEncoder

if TYPE_CHECKING:  # the readers are only imported for a base image
    from .archive import Source

MOBY_MAX_LAYERS = 125  # `docker load` refuses deeper images ("max depth exceeded")
CREATED_BY = "guix-image build"


class BuildProgress(Protocol):
    """What a build reports while it runs; the CLI draws it."""

    def layer_started(self, number: int, total: int, description: str) -> None: ...

    def layer_sized(self, size: int) -> None: ...

    def layer_progress(self, written: int) -> None: ...

    def message(self, text: str) -> None: ...


class SilentProgress:
    def layer_started(self, number: int, total: int, description: str) -> None:
        pass

    def layer_sized(self, size: int) -> None:
        pass

    def layer_progress(self, written: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class BuiltLayer:
    number: int
    diff_id: str
    size: int
    description: str
    cached: bool = False  # its digest came from the cache (and was confirmed)
    listed: bool = False  # streamed from the cached member list, without a walk


@dataclass
class BuildResult:
    image_id: str  # sha256 of the config, "sha256:<hex>"
    repo_tags: list[str]
    layers: list[BuiltLayer] = field(default_factory=list)
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)


def plan_layers(
    config: BuildConfig, *, root: str | None = None
) -> tuple[list[Layer], ImageRecord | None]:
    """Check the inputs and describe every layer, base image layers first."""
    store = Store(config.store_dir, root)
    base, layers = _base_image(config.from_image)
    encoder = HeaderEncoder(
        mtime=config.mtime, uid=config.uid, gid=config.gid, uname=config.uname, gname=config.gname
    )
    for i, paths in enumerate(config.store_layers):
        where = f"config field 'store_layers'[{i}]"
        for j, path in enumerate(paths):
            store.check_path(path, f"{where}[{j}]")
        layers.append(StoreLayer(store, paths, encoder, where))
    if config.customisation_layer is not None:
        layers.append(_customisation_layer(config.customisation_layer))
    return layers, base


def build_image(
    config: BuildConfig,
    sink: Sink,
    *,
    root: str | None = None,
    progress: BuildProgress | None = None,
    cache: LayerCache | None = None,
) -> BuildResult:
    """Stream the image `config` describes, as a Docker archive, to `sink`.

    `sink` is a file descriptor or a function that takes each block of bytes.
    With a `cache`, layers built before are streamed from their member
    lists, or without waiting for their scan, and their digests are checked
    against the cached ones.
    """
    report = progress or SilentProgress()
    layers, base = plan_layers(config, root=root)
    result = BuildResult(image_id="", repo_tags=[config.repo_tag] if config.repo_tag else [])
    if len(layers) > MOBY_MAX_LAYERS:
        result.warnings.append(
            f"the image has {len(layers)} layers; `docker load` refuses more than {MOBY_MAX_LAYERS}"
        )
    store_layers = [layer for layer in layers if isinstance(layer, StoreLayer)]
    lookup = _CacheLookup(cache, config.store_dir, root) if cache is not None else None
    scan_ahead = _ScanAhead(layers, lookup)
    try:
        with HashingWriter(sink, idle=scan_ahead.step) as writer:
            archive = DockerArchiveWriter(writer, mtime=config.mtime)
            digests: list[Digest] = []
            for number, layer in enumerate(layers, 1):
                scan_ahead.current = number - 1
                report.layer_started(number, len(layers), layer.description)
                if lookup is not None and isinstance(layer, StoreLayer):
                    lookup.consult(layer)
                size = layer.prepare()
                report.layer_sized(size)
                digests.append(archive.add_layer(layer, size, report.layer_progress))
            writer.drain()
            diff_ids = [SHA256_PREFIX + d.hexdigest() for d in digests]
            _check_digests(layers, digests, diff_ids)
            image_config = _image_config(config, base, layers, diff_ids)
            report.message("Adding manifests...")
            image_id = archive.finish(image_config.to_bytes(), result.repo_tags)
        if cache is not None:
            cache.commit_member_lists()  # before the entries that they go with
    except StaleCacheEntry:
        # Whatever else this build predicted from the cache is suspect too,
        # including the layers it did not reach.
        if lookup is not None:
            for layer in store_layers:
                if layer.cache is None or layer.cached is not None:
                    with contextlib.suppress(OSError):
                        lookup.cache.drop(lookup.key(layer))
        raise
    finally:
        if lookup is not None:
            lookup.close()
        if cache is not None:
            cache.release()
    if cache is not None:
        for layer, diff_id, digest in zip(layers, diff_ids, digests, strict=True):
            if not isinstance(layer, StoreLayer) or not layer.cache_key:
                continue
            # New entries, and checkpoints for an entry that had none (an older version's).
            if layer.cached is None or (digest.checkpoints and not layer.cached.checkpoints):
                cache.put(layer.cache_key, CachedLayer(digest.size, diff_id, digest.checkpoints))
    result.image_id = SHA256_PREFIX + image_id
    result.bytes_written = writer.position
    result.layers = [
        BuiltLayer(
            number,
            diff_id,
            digest.size,
            layer.description,
            isinstance(layer, StoreLayer) and layer.cached is not None,
            isinstance(layer, StoreLayer) and layer.member_list is not None,
        )
        for number, (layer, diff_id, digest) in enumerate(
            zip(layers, diff_ids, digests, strict=True), 1
        )
    ]
    return result


class _ScanAhead:
    """Scans the next store layers (or checks their member lists) while the writer waits.

    Most of a layer's scan then costs no time at all; `LOOKAHEAD_MEMBERS`
    bounds how much of it is held in memory ahead of the layer being written.
    """

    LOOKAHEAD_MEMBERS = 24_000  # about 17 MiB of encoded headers

    def __init__(self, layers: list[Layer], lookup: _CacheLookup | None) -> None:
        self.layers = layers
        self.lookup = lookup
        self.current = 0  # index of the layer being streamed

    def step(self) -> bool:
        ahead = 0
        for layer in self.layers[self.current + 1 :]:
            if not isinstance(layer, StoreLayer):
                continue
            if ahead >= self.LOOKAHEAD_MEMBERS:
                return False
            if self.lookup is not None and self.lookup.consult(layer):
                return True
            if layer.ahead_step():
                return True
            ahead += len(layer.planned)
        return False


class _CacheLookup:
    """Looks each store layer up in the cache, when it is first needed.

    The first layer streams as soon as its own entry is read; the others are
    looked up while the writer waits, or just before their turn.
    """

    def __init__(self, cache: LayerCache, store_dir: str, root: str | None) -> None:
        from .storedb import StoreDatabase

        self.cache = cache
        self.database = StoreDatabase.find(store_dir, root)

    def consult(self, layer: StoreLayer) -> bool:
        """Look `layer` up unless that is done; whether it was done now."""
        if layer.cache is not None:
            return False
        layer.cache = self.cache
        layer.cache_key = self.key(layer)
        layer.cached = self.cache.get(layer.cache_key)
        members = self.cache.member_list(layer.cache_key) if layer.cached else None
        if members is not None:
            layer.use_member_list(members)
        return True

    def key(self, layer: StoreLayer) -> str:
        """The layer's cache key, without looking it up."""
        return layer.cache_key or cache_key(layer.recipe(self.database))

    def close(self) -> None:
        if self.database is not None:
            self.database.close()
            self.database = None


def _check_digests(layers: list[Layer], digests: list[Digest], diff_ids: list[str]) -> None:
    for number, (layer, digest, diff_id) in enumerate(
        zip(layers, digests, diff_ids, strict=True), 1
    ):
        if isinstance(layer, StoreLayer) and layer.cached:
            if digest.broken:
                raise layer.stale("its bytes no longer reach the cached layer's checkpoints")
            if layer.cached.diff_id != diff_id:
                raise layer.stale(f"its digest is now {diff_id}, not {layer.cached.diff_id}")
        if layer.expected_diff_id is not None and layer.expected_diff_id != diff_id:
            raise InputError(  # a broken base image or customisation layer
                f"layer {number} ({layer.description}) has digest {diff_id}, "
                f"but {layer.expected_diff_id} was expected"
            )


def _image_config(
    config: BuildConfig, base: ImageRecord | None, layers: list[Layer], diff_ids: list[str]
) -> ImageConfig:
    created = config.created_text
    history: list[dict[str, Any]] = []
    image_settings = dict(config.config)
    own_layers = layers
    if base is not None:
        history.extend(h for h in base.config.get("history") or [] if isinstance(h, dict))
        base_env = base.settings.get("Env") or []
        env = merge_env(base_env, image_settings.get("Env") or [])
        if env:
            image_settings["Env"] = env
        own_layers = layers[len(base.layers) :]
    for layer in own_layers:
        history.append(HistoryEntry(created, CREATED_BY, layer.comment).to_json())
    return ImageConfig(
        architecture=config.architecture,
        os=config.os,
        created=created,
        config=image_settings,
        diff_ids=diff_ids,
        history=history,
    )


def _base_image(path: str | None) -> tuple[ImageRecord | None, list[Layer]]:
    """The base image and its layers, from an archive or layout of any form."""
    if path is None:
        return None, []
    from .archive import open_source, read_images
    from .layer_contents import HEADERS

    where = "config field 'from_image'"
    try:
        with open_source(path, HEADERS) as source:
            images = read_images(source)
            if len(images) != 1:
                raise InputError(f"{path} holds {len(images)} images; a base image must be one")
            image = images[0]
            for expectation in image.expectations:
                if expectation.name == "layer count" and not expectation.ok:
                    raise InputError(
                        f"{path}: the config has {expectation.expected} diff_ids "
                        f"but the manifest {expectation.actual} layers"
                    )
            return image, [_base_layer(source, path, ref) for ref in image.layers]
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


def _base_layer(source: Source, path: str, ref: LayerRef) -> Layer:
    from .streams import detect_compression

    description = f"from base image {path} ({ref.location})"
    extent = source.extent(ref.location)
    with source.open_blob(ref.location) as blob:
        compression = detect_compression(blob.read(8))
    if extent is not None and compression == "none":
        file, offset, size = extent
        return BlobLayer(file, offset, size, description, "", expected_diff_id=ref.diff_id)
    return InflatedLayer(source, ref, description, expected_diff_id=ref.diff_id)


def _customisation_layer(directory: str) -> BlobLayer:
    """The prebuilt layer: `layer.tar` and its `checksum`, checked before use."""
    where = f"config field 'customisation_layer': {directory}"
    checksum_path = os.path.join(directory, "checksum")
    layer_path = os.path.join(directory, "layer.tar")
    try:
        with open(checksum_path, encoding="ascii", errors="replace") as f:
            checksum = f.read().strip()
    except OSError as error:
        raise InputError(f"{where}: cannot read checksum: {error.strerror}") from None
    if not is_sha256_digest(SHA256_PREFIX + checksum):
        raise InputError(f"{where}: checksum file does not hold a sha256 hex digest")
    # Check the layer before writing anything, so that a wrong checksum is bad
    # input (exit 2, nothing written) rather than a broken archive. It is
    # checked again while streaming, in case it changes in between.
    digest = hashlib.sha256()
    size = 0
    try:
        with open(layer_path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as error:
        raise InputError(f"{where}: cannot read layer.tar: {error.strerror}") from None
    if digest.hexdigest() != checksum:
        raise InputError(
            f"{where}: layer.tar has sha256 {digest.hexdigest()}, "
            f"but its checksum file says {checksum}"
        )
    return BlobLayer(
        path=layer_path,
        offset=0,
        size=size,
        description="with customisation...",
        comment="customisation layer",
        expected_diff_id=SHA256_PREFIX + checksum,
    )
