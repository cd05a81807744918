"""The merged filesystem by the book, two ways, to check the sweep of
`guix_image.analysis.overlay` against:

- `extract_in_place`: layers extracted one entry at a time onto one tree, as
  moby's and containers/storage's `UnpackLayer` do for the vfs driver: a
  whiteout deletes whatever is there, also what its own layer put there
  before it (an opaque one spares only the paths its layer unpacked);
- `stack_layers`: each layer extracted into a tree of its own (whiteouts
  kept as markers, opaque directories flagged), then looked up from the top
  layer down as overlayfs does (docker's overlay2, containerd, podman): a
  whiteout hides only lower layers.

Written for clarity, not speed: every operation scans whole trees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

Entries = list[tuple[str, str, int]]  # (normalised path, type, size) per layer


class Unloadable(Exception):
    """Layers a loader cannot extract (an entry below a file, a whiteout over an
    entry of its own layer on overlayfs)."""


@dataclass
class Node:
    type: str  # "dir", "file", ..., or "whiteout" (a marker, overlayfs only)
    size: int
    origin: tuple[int, int] | None  # (layer from 1, position) of its entry; None: made by MkdirAll
    opaque: bool = False


@dataclass
class Merged:
    survivors: dict[str, tuple[int, int]] = field(default_factory=dict)  # path: origin
    waste: int = 0
    offenders: dict[str, tuple[int, set[int]]] = field(default_factory=dict)
    # entries a whiteout of their own layer deleted (extract_in_place)
    contested: set[str] = field(default_factory=set)

    def note_waste(self, path: str, node: Node, by_layer: int) -> None:
        if node.origin and node.type == "file" and node.size:
            self.waste += node.size
            wasted, layers = self.offenders.get(path, (0, set()))
            self.offenders[path] = (wasted + node.size, layers | {node.origin[0], by_layer})


def _below(path: str, other: str) -> bool:
    return other.startswith(path + "/") if path else bool(other)


def _parts(path: str) -> list[str]:
    return path.split("/")


def _whiteout_target(directory: str, base: str) -> str:
    return f"{directory}/{base[len(WHITEOUT) :]}".lstrip("/")


def _make_parents(tree: dict[str, Node], path: str) -> None:
    parts = _parts(path)[:-1]
    for depth in range(1, len(parts) + 1):
        parent = "/".join(parts[:depth])
        node = tree.get(parent)
        if node is None:
            tree[parent] = Node("dir", 0, None)
        elif node.type != "dir":
            raise Unloadable(f"{path}: {parent} is a {node.type}")


def _remove_all(
    tree: dict[str, Node], path: str, by_layer: int, merged: Merged, *, by_whiteout: bool = False
) -> None:
    for other in [p for p in tree if p == path or _below(path, p)]:
        node = tree.pop(other)
        merged.note_waste(other, node, by_layer)
        if by_whiteout and node.origin and node.origin[0] == by_layer:
            merged.contested.add(other)


def extract_in_place(layers: list[Entries]) -> Merged:
    """moby's UnpackLayer, entry after entry, onto one tree."""
    tree: dict[str, Node] = {}
    merged = Merged()
    for number, entries in enumerate(layers, 1):
        unpacked: set[str] = set()
        for position, (path, kind, size) in enumerate(entries):
            if not path:
                continue
            _make_parents(tree, path)  # for whiteouts too, as moby does
            directory, _, base = path.rpartition("/")
            if base == OPAQUE:
                # Walk the directory, parents first: what this layer has not
                # unpacked yet goes, with everything below it.
                for other in sorted(tree, key=_parts):
                    if other in tree and _below(directory, other) and other not in unpacked:
                        _remove_all(tree, other, number, merged, by_whiteout=True)
            elif base.startswith(WHITEOUT):
                target = _whiteout_target(directory, base)
                _remove_all(tree, target, number, merged, by_whiteout=True)
            else:
                existing = tree.get(path)
                if existing is not None and not (existing.type == kind == "dir"):
                    _remove_all(tree, path, number, merged)
                tree[path] = Node(kind, size, (number, position))
                unpacked.add(path)
    merged.survivors = {path: node.origin for path, node in tree.items() if node.origin}
    return merged


def stack_layers(layers: list[Entries]) -> Merged:
    """overlayfs: each layer a tree of its own, looked up from the top down."""
    merged = Merged()
    uppers = [_extract_alone(number, entries, merged) for number, entries in enumerate(layers, 1)]
    paths = {path for tree in uppers for path, node in tree.items() if node.origin}
    for path in sorted(paths, key=_parts):
        for number, tree in enumerate(uppers, 1):  # bottom up: the highest visible wins
            node = tree.get(path)
            if node is None or node.origin is None:
                continue
            hidden_by = _hidden_by(uppers, number, path, node)
            if hidden_by is not None:
                merged.note_waste(path, node, hidden_by)
            else:
                merged.survivors[path] = node.origin
    return merged


def _extract_alone(number: int, entries: Entries, merged: Merged) -> dict[str, Node]:
    """A layer extracted into an empty tree, as the overlay drivers do."""
    tree: dict[str, Node] = {"": Node("dir", 0, None)}
    for position, (path, kind, size) in enumerate(entries):
        if not path:
            continue
        _make_parents(tree, path)
        directory, _, base = path.rpartition("/")
        if base == OPAQUE:
            tree[directory].opaque = True
        elif base.startswith(WHITEOUT):
            target = _whiteout_target(directory, base)
            if target in tree:  # mknod of the marker fails: EEXIST
                raise Unloadable(f"{path}: {target} is there already")
            tree[target] = Node("whiteout", 0, None)
        else:
            existing = tree.get(path)
            if existing is not None and not (existing.type == kind == "dir"):
                _remove_all(tree, path, number, merged)
                existing = None
            opaque = existing is not None and existing.opaque
            tree[path] = Node(kind, size, (number, position), opaque)
    return tree


def _hidden_by(uppers: list[dict[str, Node]], number: int, path: str, node: Node) -> int | None:
    """The lowest layer above `number` that hides its `node` at `path`, if any."""
    ancestors = ["", *("/".join(_parts(path)[:depth]) for depth in range(1, len(_parts(path))))]
    for above in range(number + 1, len(uppers) + 1):
        tree = uppers[above - 1]
        for ancestor in ancestors:
            over = tree.get(ancestor)
            if over is not None and (over.type != "dir" or over.opaque):
                return above
        # A directory over a directory merges with it (opaque or not: its own
        # entry is listed as the highest declared; overlayfs would show an
        # undeclared upper's metadata).
        over = tree.get(path)
        if over is not None and (over.type != "dir" or node.type != "dir"):
            return above
    return None
