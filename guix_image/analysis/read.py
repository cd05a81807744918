"""The layers of an image, read as a command needs them, on two cores when it pays."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from typing import Any

from .. import fastpath
from ..errors import ArchiveError
from ..formats.layer_tar import FileRecord, LayerContents, ReadOptions
from ..formats.limits import MAX_ENTRIES
from ..formats.sources import Source
from ..formats.stored_layer import StoredLayer
from ..model import Image
from ..spill import Runs, Scratch, SortedRows

# Below this many bytes of layers in all, forking costs more than it saves.
FORK_MIN_BYTES = 256 << 20

OnLayer = Callable[[StoredLayer], None]


class TooMuchWork(ArchiveError):
    """The image as a whole is beyond what the readers take on."""


def read_layers(
    source: Source,
    image: Image[StoredLayer],
    options: ReadOptions,
    layers: list[StoredLayer] | None = None,
    on_layer: OnLayer | None = None,
    *,
    fork_min_bytes: int = FORK_MIN_BYTES,
) -> list[LayerContents]:
    """Read `layers` (all by default), on two cores when it pays.

    Two forked processes share the work when there is enough of it: parsing
    headers holds the GIL, so threads would take turns. Only reads that keep
    every file's record and digest use threads (hashing releases the GIL):
    those records cost more to send back than the turns.
    """
    wanted = image.layers if layers is None else layers
    # Layers naming the same blob (as `docker save` writes repeated layers) are read once.
    unique: dict[str, StoredLayer] = {}
    for layer in wanted:
        unique.setdefault(layer.location, layer)
    chosen = list(unique.values())
    done = _read(source, chosen, options, on_layer, fork_min_bytes)
    by_location = {layer.location: contents for layer, contents in zip(chosen, done, strict=True)}
    contents = [by_location[layer.location] for layer in wanted]
    if sum(layer.entries for layer in contents) > MAX_ENTRIES:
        raise TooMuchWork(
            f"{source.name}: the layers hold more than {MAX_ENTRIES} entries in all; refusing"
        )
    return contents


def _read(
    source: Source,
    chosen: list[StoredLayer],
    options: ReadOptions,
    on_layer: OnLayer | None,
    fork_min_bytes: int,
) -> list[LayerContents]:
    if source.kind == "stream" or len(chosen) < 2:
        scratch = Scratch()
        return [_read_one(layer, options, scratch, on_layer) for layer in chosen]
    # Biggest layers first, so that the workers end together.
    order = sorted(chosen, key=lambda layer: -layer.size)
    forking = sum(layer.size for layer in chosen) >= fork_min_bytes and fastpath.can_fork()
    hashing = options.hash_blob or options.hash_diff or options.hash_files
    scratch = Scratch(forking=forking)
    # Every file's record and digest costs more to send back from a process
    # than the GIL costs threads; anything smaller is better forked.
    if hashing and (options.keep_files or not forking):
        # Three threads on two cores: while one parses headers (holding the
        # GIL), the other two can hash.
        with ThreadPoolExecutor(3, "guix-image-read") as threads:
            done = list(
                threads.map(lambda layer: _read_one(layer, options, scratch, on_layer), order)
            )
    elif forking:
        packed = fastpath.forked_map(lambda layer: _packed(layer.read(options, scratch)), order)
        done = [_unpacked(*contents, scratch) for contents in packed]
    else:
        return [_read_one(layer, options, scratch, on_layer) for layer in chosen]
    results = {id(layer): contents for layer, contents in zip(order, done, strict=True)}
    return [results[id(layer)] for layer in chosen]


def _read_one(
    layer: StoredLayer, options: ReadOptions, scratch: Scratch, on_layer: OnLayer | None
) -> LayerContents:
    contents = layer.read(options, scratch)
    if on_layer is not None:
        on_layer(layer)
    return contents


Columns = list[tuple[Any, ...]] | None
Packed = tuple[LayerContents, Columns, tuple[Runs, int]]


def _packed(contents: LayerContents) -> Packed:
    """A layer's contents to be sent back from a worker: its rows written out to
    the scratch file the parent shares, its records (if kept) as columns.

    A list of records pickles one object at a time: for the 20,000 entries
    of a layer, that took longer than reading half of them.
    """
    rows = contents.rows.detach()
    columns = None
    if contents.files is not None:
        columns = list(zip(*map(_RECORD_FIELDS, contents.files), strict=True))
    files: list[FileRecord] | None = None if contents.files is None else []
    return replace(contents, files=files, rows=SortedRows()), columns, rows


def _unpacked(
    contents: LayerContents, columns: Columns, rows: tuple[Runs, int], scratch: Scratch
) -> LayerContents:
    contents.rows = SortedRows.attach(rows, scratch)
    if columns is not None and contents.files is not None:
        contents.files = list(itertools.starmap(FileRecord, zip(*columns, strict=True)))
    return contents


_RECORD_FIELDS = operator.attrgetter(*(f.name for f in fields(FileRecord)))
