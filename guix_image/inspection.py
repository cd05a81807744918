"""`inspect`: what an image is made of, layer by layer, and what it wastes.

The merged filesystem is built as loaders build it: layers applied in
order, whiteouts (`.wh.NAME`) deleting lower entries and opaque whiteouts
(`.wh..wh..opq`) hiding a directory's lower contents. Bytes of lower-layer
files that a higher layer overwrites or deletes are in the image but not in
its filesystem: that is the waste dive reports.
"""

from __future__ import annotations

import itertools
import multiprocessing
import operator
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from .archive import Source
from .image import ImageRecord, LayerRef
from .layer_contents import (
    MAX_ENTRIES,
    OPAQUE_WHITEOUT,
    WHITEOUT_PREFIX,
    Entry,
    FileRecord,
    LayerContents,
    ReadOptions,
)
from .tarreader import ArchiveError

TOP_OFFENDERS = 10


def read_layers(
    source: Source,
    image: ImageRecord,
    options: ReadOptions,
    refs: list[LayerRef] | None = None,
    on_layer: Callable[[LayerRef], None] | None = None,
) -> list[LayerContents]:
    """Read layers (all by default), on two cores when it pays.

    Two forked processes share the work when there is enough of it: parsing
    headers holds the GIL, so threads would take turns. Only reads that keep
    every file's record and digest use threads (hashing releases the GIL):
    those records cost more to send back than the turns.
    """
    wanted = image.layers if refs is None else refs
    # Layers naming the same blob (as `docker save` writes repeated layers) are read once.
    unique: dict[str, LayerRef] = {}
    for ref in wanted:
        unique.setdefault(ref.location, ref)
    chosen = list(unique.values())
    hashing = options.hash_blob or options.hash_diff or options.hash_files
    by_location = {
        ref.location: contents
        for ref, contents in zip(
            chosen, _read(source, chosen, options, hashing, on_layer), strict=True
        )
    }
    layers = [by_location[ref.location] for ref in wanted]
    if sum(layer.entries for layer in layers) > MAX_ENTRIES:
        raise TooMuchWork(
            f"{source.name}: the layers hold more than {MAX_ENTRIES} entries in all; refusing"
        )
    return layers


class TooMuchWork(ArchiveError):
    """The image as a whole is beyond what the readers take on."""


def _read(
    source: Source,
    chosen: list[LayerRef],
    options: ReadOptions,
    hashing: bool,
    on_layer: Callable[[LayerRef], None] | None,
) -> list[LayerContents]:
    def read(ref: LayerRef) -> LayerContents:
        contents = source.read_layer(ref, options)
        if on_layer is not None:
            on_layer(ref)
        return contents

    if source.kind == "stream" or len(chosen) < 2:
        return [read(ref) for ref in chosen]
    # Biggest layers first, so that the workers end together.
    order = sorted(range(len(chosen)), key=lambda i: -chosen[i].size)
    forking = sum(ref.size for ref in chosen) >= FORK_MIN_BYTES and _can_fork()
    # Every file's record and digest costs more to send back from a process
    # than the GIL costs threads; anything smaller is better forked.
    if hashing and (options.keep_files or not forking):
        # Three threads on two cores: while one parses headers (holding the
        # GIL), the other two can hash.
        with ThreadPoolExecutor(3, "guix-image-read") as threads:
            done = list(threads.map(lambda i: read(chosen[i]), order))
    elif forking:
        _FORKED["work"] = (source, chosen, options)
        try:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(2, mp_context=context) as processes:
                done = [_unpacked(*packed) for packed in processes.map(_read_forked, order)]
        finally:
            _FORKED.clear()
    else:
        return [read(ref) for ref in chosen]
    results = dict(zip(order, done, strict=True))
    return [results[i] for i in range(len(chosen))]


FORK_MIN_BYTES = 256 << 20
# What forked readers inherit: the source, the layers and the options.
_FORKED: dict[str, tuple[Source, list[LayerRef], ReadOptions]] = {}


def _read_forked(index: int) -> tuple[LayerContents, list[tuple[Any, ...]] | None]:
    """A layer's contents, sent back with its entries as columns.

    A list of named tuples or records pickles one object at a time: for the
    20,000 entries of a layer, that took longer than reading half of them.
    """
    source, refs, options = _FORKED["work"]
    contents = source.read_layer(refs[index], options)
    if contents.files is not None:
        columns = list(zip(*map(_RECORD_FIELDS, contents.files), strict=True))
        return replace(contents, files=[]), columns
    if contents.paths is not None:
        return replace(contents, paths=[]), list(zip(*contents.paths, strict=True))
    return contents, None


def _unpacked(contents: LayerContents, columns: list[tuple[Any, ...]] | None) -> LayerContents:
    if columns is not None and contents.files is not None:
        contents.files = list(itertools.starmap(FileRecord, zip(*columns, strict=True)))
    elif columns is not None and contents.paths is not None:
        contents.paths = list(map(Entry._make, zip(*columns, strict=True)))
    return contents


_RECORD_FIELDS = operator.attrgetter(*(f.name for f in fields(FileRecord)))


def _can_fork() -> bool:
    from .hashing_pipeline import only_thread

    return hasattr(os, "fork") and only_thread()


class HasPath(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def size(self) -> int: ...


@dataclass
class MergedEntry:
    record: Any  # a FileRecord or an Entry
    layer: int  # from 1


@dataclass
class Waste:
    bytes: int = 0
    # path -> (wasted bytes, layers the path appears in)
    offenders: dict[str, list[Any]] = field(default_factory=dict)

    def note(self, path: str, size: int, layer: int) -> None:
        entry = self.offenders.setdefault(path, [0, []])
        entry[0] += size
        if layer not in entry[1]:
            entry[1].append(layer)
        self.bytes += size


def merge_layers(layers: Sequence[Sequence[HasPath]]) -> tuple[dict[str, MergedEntry], Waste]:
    """The filesystem the layers make together, and the bytes hidden in lower layers."""
    merged: dict[str, MergedEntry] = {}
    # directory -> paths directly inside it; built only once something is deleted
    children: dict[str, set[str]] | None = None
    waste = Waste()

    def index() -> dict[str, set[str]]:
        nonlocal children
        if children is None:
            children = {}
            for path in merged:
                children.setdefault(path.rpartition("/")[0], set()).add(path)
        return children

    def remove(path: str, by_layer: int) -> None:
        tree = index()
        entry = merged.pop(path, None)
        if entry is not None:
            if entry.record.type == "file" and entry.record.size:
                waste.note(path, entry.record.size, entry.layer)
                waste.offenders[path][1].append(by_layer)
            tree.get(path.rpartition("/")[0], set()).discard(path)
        for child in list(tree.pop(path, ())):
            remove(child, by_layer)

    for number, records in enumerate(layers, 1):
        for record in records:
            path = record.path
            if not path:  # the layer's root, "./"
                continue
            directory, _, name = path.rpartition("/")
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_WHITEOUT:
                    for child in list(index().get(directory, ())):
                        if merged[child].layer < number:
                            remove(child, number)
                else:
                    remove(f"{directory}/{name[len(WHITEOUT_PREFIX) :]}".lstrip("/"), number)
                continue
            previous = merged.get(path)
            if previous is not None and not (previous.record.type == record.type == "dir"):
                remove(path, number)
            merged[path] = MergedEntry(record, number)
            if children is not None:
                children.setdefault(directory, set()).add(path)
    for path in waste.offenders:
        waste.offenders[path][1] = sorted(set(waste.offenders[path][1]))
    return merged, waste


def duplicated_paths(layers: Sequence[Sequence[HasPath]]) -> dict[str, list[int]]:
    """Regular files present in more than one layer, with those layers."""
    first: dict[str, int] = {}  # a list only for the few paths seen again
    again: dict[str, list[int]] = {}
    for number, records in enumerate(layers, 1):
        for record in records:
            if record.type == "file":
                path = record.path
                if path in first:
                    again.setdefault(path, [first[path]]).append(number)
                else:
                    first[path] = number
    return again


def summarize(
    source: Source,
    image: ImageRecord,
    contents: list[LayerContents],
) -> dict[str, Any]:
    """The facts `inspect --json` documents (see README.md)."""
    history = image.layer_history()
    layers = []
    for ref, layer, entry in zip(image.layers, contents, history, strict=True):
        layers.append(
            {
                "index": ref.index,
                "diff_id": ref.diff_id,
                "digest": ref.digest,
                "media_type": ref.media_type,
                "compression": layer.compression,
                "size": ref.size,
                "uncompressed_size": layer.size,
                "entries": layer.entries,
                "comment": entry.get("comment"),
                "created_by": entry.get("created_by"),
            }
        )
    records = [layer.entry_list() for layer in contents]
    merged, waste = merge_layers(records)
    duplicates = duplicated_paths(records)
    total = sum(ref.size for ref in image.layers)
    # Waste is in uncompressed bytes, so the efficiency is too (as dive's).
    unpacked = sum(
        layer.size if layer.size is not None else ref.size
        for ref, layer in zip(image.layers, contents, strict=True)
    )
    offenders = sorted(waste.offenders.items(), key=lambda item: (-item[1][0], item[0]))
    settings = image.settings
    return {
        "format": image.format,
        "repo_tags": image.repo_tags,
        "config_digest": image.config_digest,
        "architecture": image.config.get("architecture"),
        "os": image.config.get("os"),
        "created": image.config.get("created"),
        "config": settings,
        "layers": layers,
        "total_size": total,
        "files": len(merged),
        "waste": {
            "bytes": waste.bytes,
            "efficiency": round(1 - waste.bytes / unpacked, 4) if unpacked else 1.0,
            "largest": [
                {"path": path, "bytes": wasted, "layers": layer_numbers}
                for path, (wasted, layer_numbers) in offenders[:TOP_OFFENDERS]
            ],
            "duplicated_files": len(duplicates),
        },
    }


def layer_files(contents: LayerContents) -> list[dict[str, Any]]:
    return [record.to_json() for record in contents.files or []]


def merged_files(contents: list[LayerContents]) -> list[dict[str, Any]]:
    merged, _ = merge_layers([layer.files or [] for layer in contents])
    return [
        {**entry.record.to_json(), "layer": entry.layer}
        for _, entry in sorted(
            merged.items(), key=lambda item: item[0].encode("utf-8", "surrogateescape")
        )
    ]
