"""`build`: turn a BuildConfig into an image: a Docker archive streamed to a
sink, or OCI (see oci.py).

What can be checked cheaply is checked before the first byte is written
(see plan.py). Then every layer is streamed once: its tar header carries
the size computed from the scan, and its digest is computed on the way and
checked against whatever was stated in advance (by the cache, a base image,
a checksum). What only the scan or the copy can find (a fifo deep in a
store path, a file changing, a base layer whose bytes do not match its
diff_id) fails the build after output has begun; with an output file, none
is left behind (see output.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InputError
from ..fastpath import HashingWriter, Sink
from ..formats.docker_archive import DockerArchiveWriter
from ..formats.limits import MAX_CONFIG_SIZE
from ..formats.stored_layer import StoredLayer
from ..model import (
    SHA256_PREFIX,
    HistoryEntry,
    Image,
    ImageConfig,
    Layer,
    Measured,
    PendingDigest,
    Progress,
    merge_env,
)
from ..store.database import StoreDatabase
from .cache import LayerCache
from .config import BuildConfig
from .oci import LayerBlob, OciOutput
from .plan import Plan, plan_layers
from .store_layer import MAX_PLANNED, StaleCacheEntry, StoreLayer

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


class ImageWriter(Protocol):
    """Writes an image in one format: layers in order, then the rest."""

    sizes_first: bool  # whether a layer's tar size must be known before it is added
    forked: bool  # whether a forked process hashed and wrote (see fastpath)
    manifest_digest: str | None  # OCI: the image's manifest
    blobs: list[LayerBlob]  # OCI: each layer's blob, in order
    # Compressed blobs made of the layers, by position: (label, digest, size),
    # for the cache (see oci.py).
    new_blobs: dict[int, tuple[str, str, int]]

    @property
    def bytes_written(self) -> int:
        """What the output holds, once complete."""
        ...

    def add_layer(self, layer: Layer, progress: Progress) -> PendingDigest:
        """Stream `layer`; its digest is final once the writer drains."""
        ...

    def drain(self) -> None: ...

    def finish(self, config: bytes, repo_tags: list[str]) -> str:
        """Add the config and whatever lists the image; the image id."""
        ...


class ImageOutput(Protocol):
    """Where a build goes, in which format (DockerOutput here, OciOutput in oci.py)."""

    def open(
        self, idle: Callable[[], bool], checkpoint_interval: int | None
    ) -> AbstractContextManager[ImageWriter]:
        """The writer; leaving the block normally completes the output.

        `idle` is the build's chance to scan ahead while the writer waits.
        """
        ...


class DockerOutput:
    """A Docker archive streamed to `sink` (a file descriptor or a function)."""

    def __init__(self, sink: Sink, *, mtime: int) -> None:
        self.sink = sink
        self.mtime = mtime

    @contextlib.contextmanager
    def open(
        self, idle: Callable[[], bool], checkpoint_interval: int | None
    ) -> Iterator[ImageWriter]:
        with HashingWriter(self.sink, idle=idle, checkpoint_interval=checkpoint_interval) as out:
            writer = _DockerWriter(out, self.mtime)
            yield writer
        writer.bytes_written, writer.forked = out.position, out.forked


class _DockerWriter:
    sizes_first = True

    def __init__(self, out: HashingWriter, mtime: int) -> None:
        self._out = out
        self._archive = DockerArchiveWriter(out, mtime=mtime)
        self.bytes_written = 0
        self.forked = False
        self.manifest_digest: str | None = None
        self.blobs: list[LayerBlob] = []
        self.new_blobs: dict[int, tuple[str, str, int]] = {}

    def add_layer(self, layer: Layer, progress: Progress) -> PendingDigest:
        return self._archive.add_layer(layer, progress)

    def drain(self) -> None:
        self._out.drain()

    def finish(self, config: bytes, repo_tags: list[str]) -> str:
        return self._archive.finish(config, repo_tags)


@dataclass
class BuiltLayer:
    number: int
    diff_id: str
    size: int
    description: str
    cached: bool = False  # its digest came from the cache (and was confirmed)
    listed: bool = False  # streamed from the cached member list, without a walk
    blob: LayerBlob | None = None  # OCI: the blob it is stored as


@dataclass
class BuildResult:
    image_id: str  # sha256 of the config, "sha256:<hex>"
    repo_tags: list[str]
    layers: list[BuiltLayer] = field(default_factory=list)
    bytes_written: int = 0
    forked: bool = False  # whether a forked process hashed and wrote (see fastpath)
    manifest_digest: str | None = None  # OCI: the image's manifest


def build_image(
    config: BuildConfig,
    output: Sink | ImageOutput,
    *,
    root: str | None = None,
    progress: BuildProgress | None = None,
    cache: LayerCache | None = None,
    max_planned: int = MAX_PLANNED,
) -> BuildResult:
    """Write the image `config` describes to `output`: an ImageOutput, or a
    Docker archive to a file descriptor or a function that takes each block of
    bytes. With a `cache`, layers built before are streamed from their member
    lists, or without waiting for their scan, and their digests are checked
    against the cached ones.
    """
    report = progress or SilentProgress()
    plan = plan_layers(config, root=root, max_planned=max_planned)
    result = BuildResult(image_id="", repo_tags=config.repo_tags)
    _refuse_what_loaders_refuse(config, plan)
    caching = _Caching(cache, plan, config.store_dir, root) if cache is not None else None
    scan_ahead = _ScanAhead(plan, caching)
    interval = cache.checkpoint_interval if cache is not None else None
    if isinstance(output, int) or callable(output):
        output = DockerOutput(output, mtime=config.mtime)
    try:
        with output.open(scan_ahead.step, interval) as archive:
            pending = []
            for number, layer in enumerate(plan.layers, 1):
                scan_ahead.current = number - 1
                report.layer_started(number, len(plan.layers), layer.description)
                if caching is not None:
                    caching.consult(number - 1)
                if archive.sizes_first:
                    report.layer_sized(layer.tar_size())
                pending.append(archive.add_layer(layer, report.layer_progress))
            archive.drain()
            measured = [digest.result() for digest in pending]
            for number, (layer, layer_measured) in enumerate(
                zip(plan.layers, measured, strict=True), 1
            ):
                layer.check(layer_measured, number)
            image_config = _image_config(config, plan, [m.digest for m in measured])
            report.message("Adding manifests...")
            result.image_id = archive.finish(image_config.to_bytes(), result.repo_tags)
        if caching is not None:
            caching.cache.commit_member_lists()  # before the entries that they go with
    except StaleCacheEntry:
        if caching is not None:
            caching.drop_predictions()
        raise
    finally:
        if caching is not None:
            caching.close()
    if caching is not None:
        caching.record(measured, archive.new_blobs)
        made = [archive.manifest_digest, result.image_id] if archive.manifest_digest else []
        caching.cache.use_blobs([blob.digest for blob in archive.blobs] + made)
        caching.cache.trim_blobs()
    result.bytes_written = archive.bytes_written
    result.forked = archive.forked
    result.manifest_digest = archive.manifest_digest
    result.layers = [
        _built(number, layer, layer_measured, plan.store_layers.get(number - 1))
        for number, (layer, layer_measured) in enumerate(zip(plan.layers, measured, strict=True), 1)
    ]
    for built, blob in zip(result.layers, archive.blobs, strict=False):
        built.blob = blob
    return result


def build_index(
    builds: list[tuple[BuildConfig, str | None]],
    output: OciOutput,
    names: list[str],
    **options: Any,
) -> list[BuildResult]:
    """Build each (config, root) of `builds` into `output`, one image per
    platform, listed under `names` by one image index (its digest is then
    `output.index_digest`). `options` are build_image's."""
    architectures = [config.architecture for config, _ in builds]
    for architecture in architectures:
        if architectures.count(architecture) > 1:
            raise InputError(f"two images for {architecture}: an index has one per platform")
    with output.several(names):
        return [build_image(config, output, root=root, **options) for config, root in builds]


def _refuse_what_loaders_refuse(config: BuildConfig, plan: Plan) -> None:
    """Before a byte is written: an image loaders would refuse is bad input."""
    if len(plan.layers) > MOBY_MAX_LAYERS:
        raise InputError(
            f"the image would have {len(plan.layers)} layers; "
            f"`docker load` refuses more than {MOBY_MAX_LAYERS}"
        )
    # Every diff_id has the same length: the config's size is known now.
    placeholders = [SHA256_PREFIX + "0" * 64] * len(plan.layers)
    size = len(_image_config(config, plan, placeholders).to_bytes())
    if size > MAX_CONFIG_SIZE:
        raise InputError(
            f"the image config would be {size} bytes; loaders refuse more than {MAX_CONFIG_SIZE}"
        )


def _built(
    number: int, layer: Layer, measured: Measured, store_layer: StoreLayer | None
) -> BuiltLayer:
    cached = store_layer is not None and store_layer.cached is not None
    listed = store_layer is not None and store_layer.member_list is not None
    return BuiltLayer(number, measured.digest, measured.size, layer.description, cached, listed)


class _Caching:
    """The cache's part in one build: each store layer looked up when first needed,
    its predictions dropped if one was wrong, new entries recorded at the end.

    The first layer streams as soon as its own entry is read; the others are
    looked up while the writer waits, or just before their turn.
    """

    def __init__(self, cache: LayerCache, plan: Plan, store_dir: str, root: str | None) -> None:
        self.cache = cache
        self.store_layers = plan.store_layers
        self.database = StoreDatabase.find(store_dir, root)

    def consult(self, position: int) -> bool:
        """Look up the layer at `position` unless that is done; whether it was done now."""
        layer = self.store_layers.get(position)
        return layer is not None and layer.look_up(self.cache, self.database)

    def drop_predictions(self) -> None:
        """One prediction was wrong: whatever else the build predicted is suspect too,
        including the layers it did not reach."""
        for layer in self.store_layers.values():
            if layer.cache is None or layer.cached is not None:
                self.cache.drop(layer.key(self.database))

    def record(self, measured: list[Measured], blobs: dict[int, tuple[str, str, int]]) -> None:
        """Record what is new: entries, checkpoints, and `blobs` compressed by
        this build (see ImageWriter)."""
        for position, layer in self.store_layers.items():
            entry = layer.entry(measured[position], blobs.get(position))
            if entry is not None and layer.cache_key is not None:
                self.cache.put(layer.cache_key, entry)

    def close(self) -> None:
        self.cache.release()
        if self.database is not None:
            self.database.close()
            self.database = None


class _ScanAhead:
    """Scans the next store layers (or checks their member lists) while the writer waits.

    Most of a layer's scan then costs no time at all; `LOOKAHEAD_MEMBERS`
    bounds how much of it is held in memory ahead of the layer being written.
    """

    LOOKAHEAD_MEMBERS = 24_000  # about 17 MiB of encoded headers

    def __init__(self, plan: Plan, caching: _Caching | None) -> None:
        self.store_layers = sorted(plan.store_layers.items())
        self.caching = caching
        self.current = 0  # position of the layer being streamed

    def step(self) -> bool:
        ahead = 0
        for position, layer in self.store_layers:
            if position <= self.current:
                continue
            if ahead >= self.LOOKAHEAD_MEMBERS:
                return False
            if self.caching is not None and self.caching.consult(position):
                return True
            if layer.ahead_step():
                return True
            ahead += len(layer.planned)
        return False


def _image_config(config: BuildConfig, plan: Plan, diff_ids: list[str]) -> ImageConfig:
    created = config.created_text
    history: list[dict[str, Any]] = []
    image_settings = dict(config.config)
    own_layers = plan.layers
    base: Image[StoredLayer] | None = plan.base
    if base is not None:
        history.extend(h for h in base.config.get("history") or [] if isinstance(h, dict))
        base_env = base.settings.get("Env") or []
        env = merge_env(base_env, image_settings.get("Env") or [])
        if env:
            image_settings["Env"] = env
        own_layers = plan.layers[len(base.layers) :]
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
