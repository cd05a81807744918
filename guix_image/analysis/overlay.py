"""The merged filesystem, as loaders build it from layers, and the bytes it hides.

Layers are applied in order: whiteouts (`.wh.NAME`) delete lower entries
and opaque whiteouts (`.wh..wh..opq`) hide a directory's lower contents.
Bytes of lower-layer files that a higher layer overwrites or deletes are in
the image but not in its filesystem: that is the waste dive reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..formats.layer_tar import OPAQUE_WHITEOUT, WHITEOUT_PREFIX


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
                link(children, path)
        return children

    def remove(path: str, by_layer: int) -> None:
        """Delete `path` and everything below it (iteratively: trees may be deep)."""
        tree = index()
        stack = [path]
        while stack:
            current = stack.pop()
            entry = merged.pop(current, None)
            if entry is not None:
                if entry.record.type == "file" and entry.record.size:
                    waste.note(current, entry.record.size, entry.layer)
                    waste.offenders[current][1].append(by_layer)
                tree.get(current.rpartition("/")[0], set()).discard(current)
            stack.extend(tree.pop(current, ()))

    def hide_lower(directory: str, by_layer: int) -> None:
        """An opaque whiteout: every entry below `directory` from a lower layer goes,
        also below a subdirectory the same layer declared again (overlayfs shows
        none of the lower directory)."""
        tree = index()
        stack = [directory]
        while stack:
            for child in list(tree.get(stack.pop(), ())):
                entry = merged.get(child)  # None: a directory no entry declared
                if entry is not None and entry.layer < by_layer:
                    remove(child, by_layer)
                else:
                    stack.append(child)

    for number, records in enumerate(layers, 1):
        for record in records:
            path = record.path
            if not path:  # the layer's root, "./"
                continue
            directory, _, name = path.rpartition("/")
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_WHITEOUT:
                    hide_lower(directory, number)
                else:
                    remove(f"{directory}/{name[len(WHITEOUT_PREFIX) :]}".lstrip("/"), number)
                continue
            previous = merged.get(path)
            if previous is not None and not (previous.record.type == record.type == "dir"):
                remove(path, number)
            merged[path] = MergedEntry(record, number)
            if children is not None:
                link(children, path)
    for path in waste.offenders:
        waste.offenders[path][1] = sorted(set(waste.offenders[path][1]))
    return merged, waste


def link(children: dict[str, set[str]], path: str) -> None:
    """Record `path` in its directory, and each directory in its own, up to one
    already recorded: a layer may hold a/b/c with no entry for a/b, and deleting
    a must still reach it."""
    while path:
        directory = path.rpartition("/")[0]
        siblings = children.setdefault(directory, set())
        if path in siblings:
            return
        siblings.add(path)
        path = directory


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
