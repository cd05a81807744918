"""The merged filesystem, as loaders build it from layers, and the bytes it hides.

The filesystem is overlayfs's, as docker's overlay2, containerd and podman
mount the layers (and as umoci unpacks them): each layer is what extracting
it alone gives, and a path is looked up from the top layer down:

- an entry hides what lower layers have at its path, and everything below
  that path, unless both are directories (a directory merges with the
  directory below it); a directory a layer makes for an entry without
  declaring it counts as a directory of that layer;
- a whiteout `.wh.NAME` hides NAME and everything below it in lower layers,
  unless its own layer declares the directory NAME after it;
- an opaque whiteout `.wh..wh..opq` hides what lower layers have below its
  directory.

Extracting layers in place, one after the other (the vfs driver of docker
and podman), makes another filesystem in some layers: a whiteout there also
deletes what its own layer put before it (an opaque one, walking down from
its directory, deletes the first path its layer did not unpack, with
everything below: moby's `unpackedPaths`), a whiteout followed by its
directory deletes the lower directory's contents, and an entry below a
lower layer's file fails. The sweep works out both and counts the paths
where they differ (`Tally.contested`): `verify` fails such images.

Bytes of lower-layer files that a higher layer overwrites or deletes are in
the image but not in its filesystem: that is the waste dive reports.

The filesystem is computed in one sweep over every layer's entries merged
in tree order (`SortedRows`, spilled to disk beyond what memory holds): a
path's entries, from every layer, come together, after its directory's.
What happens to a path is decided by its own entries and by the deletions
of the directories above it, kept on a stack while the sweep is below
them, so memory does not grow with the number of entries.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from ..formats.layer_tar import (
    ENTRY,
    IMPLIED,
    KIND,
    LINK_TARGET,
    OPAQUE,
    WHITEOUT,
    FileRecord,
    key_path,
)

# Kinds of events at a path, besides a layer's own (ENTRY, WHITEOUT, OPAQUE).
_REMOVED = -1  # a directory above was deleted, or replaced by a non-directory
_OPAQUE_ABOVE = -2  # an opaque whiteout, passed on by the parent directory
_OPAQUE_BEYOND = -3  # an opaque whiteout above a directory no entry declared

TOP_OFFENDERS = 10


# The rows of the sweep: a layer's row with the layer's number second,
#   (tree key, layer, position, kind, type, size, name as stored, record fields)
_LAYER, _TYPE, _SIZE, _RECORD = 1, 4, 5, 7


class Survivor:
    """An entry of the merged filesystem, and the layer it comes from (from 1)."""

    __slots__ = ("key", "layer", "row")

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.key: bytes = row[0]  # the tree key of its path
        self.layer: int = row[_LAYER]
        self.row = row

    @property
    def path(self) -> str:
        return key_path(self.key)

    def record(self) -> FileRecord:
        """Its full record (the layers were read with keep_records)."""
        return FileRecord(*self.row[_RECORD])


@dataclass
class Tally:
    """What the sweep counts: the merged filesystem's size and the waste."""

    files: int = 0
    waste_bytes: int = 0
    duplicated_files: int = 0  # regular files present in more than one layer
    # Entries a whiteout of their own layer comes after and covers, which loaders
    # apply differently: how many, and the first few paths
    contested: int = 0
    contested_paths: list[str] = field(default_factory=list)
    # (-bytes, path, layers): the largest offenders, trimmed as it grows
    _offenders: list[tuple[int, str, list[int]]] = field(default_factory=list)

    def offend(self, path: str, wasted: int, layers: list[int]) -> None:
        self.waste_bytes += wasted
        self._offenders.append((-wasted, path, layers))
        if len(self._offenders) > 64 * TOP_OFFENDERS:
            self._offenders = heapq.nsmallest(TOP_OFFENDERS, self._offenders)

    def contest(self, path: str) -> None:
        self.contested += 1
        if len(self.contested_paths) < TOP_OFFENDERS:
            self.contested_paths.append(path)

    def largest(self) -> list[tuple[str, int, list[int]]]:
        """Paths hiding the most bytes: (path, bytes, layers it appears in)."""
        return [
            (path, -negated, layers)
            for negated, path, layers in heapq.nsmallest(TOP_OFFENDERS, self._offenders)
        ]


@dataclass
class _Frame:
    """A path with entries below it still to come, and what deletes them."""

    key: bytes  # its tree key
    # (layer, position) of each deletion of its subtree, and whether a whiteout
    # made it
    removals: list[tuple[tuple[int, int], bool]]
    # (layer, position) of the opaque whiteouts its children meet: its own, and
    # those above it that its entry (declared in their layer) passed on
    opaques: list[tuple[int, int]]
    prefix: bytes = field(init=False)  # what the keys below it start with

    def __post_init__(self) -> None:
        # Once: the sweep compares it with every key that follows.
        self.prefix = self.key + b"\0" if self.key else b""


def merged_filesystem(
    layers: Sequence[Iterable[tuple[Any, ...]]], tally: Tally | None = None
) -> Iterator[Survivor]:
    """The entries of the merged filesystem, in tree order, each with its layer.

    `layers` are the layers' rows sorted (`LayerContents.rows`), lowest
    layer first; `tally` (if given) counts files and waste on the way.
    """
    tally = tally if tally is not None else Tally()
    root = _Frame(b"", [], [])
    stack: list[_Frame] = [root]  # the frames of paths above the current one, root first
    for key, group in itertools.groupby(_in_tree_order(layers), itemgetter(0)):
        if not key:  # the root: only its opaque whiteouts matter
            root.opaques.extend((row[1], row[2]) for row in group if row[3] == OPAQUE)
            continue
        while len(stack) > 1 and not key.startswith(stack[-1].prefix):
            stack.pop()
        rows = list(group)
        if len(rows) == 1 and len(stack) == 1 and not root.opaques and rows[0][3] == ENTRY:
            # The common case: one entry, nothing deleted above it.
            row = rows[0]
            if row[_TYPE] != "dir":  # it deletes what the layers put below it before
                stack.append(_Frame(key, [((row[1], row[2]), False)], []))
            tally.files += 1
            yield Survivor(row)
            continue
        survivor, below = _settle(key, rows, stack, tally)
        if below is not None:
            stack.append(below)
        if survivor is not None:
            tally.files += 1
            yield survivor


def tally(layers: Sequence[Iterable[tuple[Any, ...]]]) -> Tally:
    """What `merged_filesystem` counts, without the entries."""
    counted = Tally()
    for _ in merged_filesystem(layers, counted):
        pass
    return counted


def _in_tree_order(layers: Sequence[Iterable[tuple[Any, ...]]]) -> Iterator[tuple[Any, ...]]:
    """Every layer's rows, as (key, layer, position, kind, ...the row's other fields),
    merged in tree order, then layer, then position."""
    numbered = [_numbered(rows, number) for number, rows in enumerate(layers, 1)]
    return numbered[0] if len(numbered) == 1 else heapq.merge(*numbered)


def _numbered(rows: Iterable[tuple[Any, ...]], layer: int) -> Iterator[tuple[Any, ...]]:
    return ((row[0], layer, *row[1:]) for row in rows if row[KIND] != LINK_TARGET)


def _events_above(key: bytes, stack: list[_Frame]) -> list[tuple[tuple[int, int], int, Any]]:
    """The deletions the directories above `key` bring: (when, kind, detail).

    An opaque whiteout reaches a path as the walk of extraction in place
    does, down from its directory: a path whose parent passed it on
    (`_OPAQUE_ABOVE`) goes unless this layer declared it before the
    whiteout; a path below one that no entry declared (`_OPAQUE_BEYOND`)
    goes with that undeclared directory. What goes from lower layers is
    hidden by overlayfs too; what goes from the whiteout's own layer stays,
    and is contested.
    """
    parent = key.rpartition(b"\0")[0]
    events: list[tuple[tuple[int, int], int, Any]] = []
    met: set[tuple[int, int]] = set()
    for frame in reversed(stack):
        events.extend((when, _REMOVED, opaque) for when, opaque in frame.removals)
        for when in frame.opaques:
            if when not in met:  # only the innermost frame passing it on counts
                met.add(when)
                kind = _OPAQUE_ABOVE if frame.key == parent else _OPAQUE_BEYOND
                events.append((when, kind, when[0]))
    return events


def _redeclared_whiteouts(rows: list[tuple[Any, ...]]) -> set[tuple[int, int]]:
    """The whiteouts at a path that a directory entry of their own layer follows."""
    whiteouts = [(row[1], row[2]) for row in rows if row[3] == WHITEOUT]
    if not whiteouts:
        return set()
    directories = [(row[1], row[2]) for row in rows if row[3] == ENTRY and row[_TYPE] == "dir"]
    return {
        (layer, seq)
        for layer, seq in whiteouts
        if any(there == layer and later > seq for there, later in directories)
    }


def _settle(
    key: bytes, rows: list[tuple[Any, ...]], stack: list[_Frame], tally: Tally
) -> tuple[Survivor | None, _Frame | None]:
    """Apply, in order, a path's own rows and the deletions above it.

    The survivor (if any), and the frame its subtree needs (if anything
    deletes below it).
    """
    events: list[tuple[tuple[int, int], int, Any]] = list(_events_above(key, stack))
    events.extend(((row[1], row[2]), row[3], row) for row in rows)
    events.sort(key=itemgetter(0))
    current: tuple[Any, ...] | None = None  # the row of what is at the path
    declared = 0  # the layer of the last entry at the path
    removals: list[tuple[tuple[int, int], bool]] = []
    opaques: list[tuple[int, int]] = []
    wasted, blamed, contested = 0, set[int](), False
    file_layers = {row[_LAYER] for row in rows if row[3] == ENTRY and row[_TYPE] == "file"}
    redeclared = _redeclared_whiteouts(rows)
    if len(file_layers) > 1:
        tally.duplicated_files += 1

    def delete(by_layer: int, by_whiteout: bool = False) -> None:
        nonlocal current, wasted, contested
        if current is None:
            return
        if by_whiteout and current[_LAYER] == by_layer:
            # overlayfs and umoci: a whiteout hides lower layers only, so it
            # stays; extracted in place (the vfs driver), it goes.
            contested = True
            return
        if current[_TYPE] == "file" and current[_SIZE]:
            wasted += current[_SIZE]
            blamed.update((current[_LAYER], by_layer))
        current = None

    for when, kind, detail in events:
        if kind == _REMOVED:
            delete(when[0], detail)
        elif kind == _OPAQUE_ABOVE and declared == when[0]:
            # Declared in the whiteout's layer before it (even if deleted since,
            # as `unpackedPaths` has it): its children decide.
            opaques.append(when)
        elif kind == WHITEOUT and when in redeclared:
            # overlayfs: the directory replaces the whiteout's mark in the
            # upper layer and merges with the lower ones; in place, the lower
            # ones are deleted first.
            contested = True
        elif kind in (_OPAQUE_ABOVE, _OPAQUE_BEYOND, WHITEOUT):
            delete(when[0], True)
            removals.append((when, True))
        elif kind == OPAQUE:
            opaques.append(when)
        elif kind == IMPLIED:
            if current is not None and current[_TYPE] != "dir" and current[_LAYER] < when[0]:
                # overlayfs: the upper layer's directory hides it; extracted in
                # place, no directory can be made there and the layer fails.
                contested = True
                delete(when[0])
        else:  # an entry
            if detail[_TYPE] != "dir" or (current is not None and current[_TYPE] != "dir"):
                delete(when[0])  # it replaces what is there, and everything below
                removals.append((when, False))
            current = detail
            declared = when[0]
    if wasted:
        tally.offend(key_path(key), wasted, sorted(blamed))
    if contested:
        tally.contest(key_path(key))
    survivor = None if current is None else Survivor(current)
    below = _Frame(key, removals, opaques) if removals or opaques else None
    return survivor, below
