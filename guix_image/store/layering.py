"""How a closure's store items are spread over at most `budget` layers.

Every strategy is deterministic: the same closure gives the same layers,
ties broken by path. Layers come bottom first: what changes least goes
lowest, so that an update ships only the layers above what changed.

- `popularity`: nixpkgs' popularity contest. An item's score is the number
  of items in the closure that depend on it (itself included); the most
  popular items get a layer each, the rest share the last one.
- `size`: what `guix pack --max-layers` does: the largest items a layer each,
  the rest in one.
- `auto` (the default): the largest items a layer each, the given items (the
  application, which changes most) in the top layer of their own, and every
  other item grouped with the items that share its set of dependents among
  the large ones: a library that only one large item uses travels with
  nothing else, so an update of that item ships it alone. Where there are
  more groups than layers left, the smallest groups share one layer.
"""

from __future__ import annotations

from collections.abc import Callable

from .closure import StoreGraph, ancestors

STRATEGIES = ("auto", "popularity", "size")
DEFAULT_STRATEGY = "auto"

Layers = list[list[str]]


def plan_layers(graph: StoreGraph, budget: int, strategy: str = DEFAULT_STRATEGY) -> Layers:
    """The closure's items in at most `budget` (at least 1) layers, bottom first."""
    if budget < 1:
        raise ValueError("a budget of at least one layer")
    plans: dict[str, Callable[[StoreGraph, int], Layers]] = {
        "auto": _auto,
        "popularity": _popularity,
        "size": _size,
    }
    layers = [sorted(layer) for layer in plans[strategy](graph, budget) if layer]
    assert len(layers) <= budget
    assert sorted(path for layer in layers for path in layer) == graph.items
    return layers


def _singles_then_rest(ranked: list[str], budget: int) -> Layers:
    singles = ranked[: budget - 1] if len(ranked) > budget else ranked
    rest = ranked[len(singles) :]
    return [[path] for path in singles] + ([rest] if rest else [])


def _popularity(graph: StoreGraph, budget: int) -> Layers:
    score = {path: mask.bit_count() for path, mask in ancestors(graph).items()}
    return _singles_then_rest(sorted(graph.items, key=lambda p: (-score[p], p)), budget)


def _size(graph: StoreGraph, budget: int) -> Layers:
    by_size = sorted(graph.items, key=lambda p: (-graph.sizes[p], p))
    return _singles_then_rest(by_size, budget)


def _auto(graph: StoreGraph, budget: int) -> Layers:
    roots = [path for path in graph.roots if path in graph.references]
    chosen = set(roots)
    others = [path for path in graph.items if path not in chosen]
    if budget == 1 or not others:
        return [graph.items]
    room = budget - 1  # the top layer holds the given items
    by_size = sorted(others, key=lambda p: (-graph.sizes[p], p))
    large = by_size[: max(1, room // 2)] if len(others) > room else others
    dependents = ancestors(graph)
    index = {path: number for number, path in enumerate(graph.items)}
    large_mask = 0
    for path in large:
        large_mask |= 1 << index[path]
    groups: dict[int, list[str]] = {}
    for path in by_size[len(large) :]:
        groups.setdefault(dependents[path] & large_mask, []).append(path)
    ranked = sorted(
        groups.values(), key=lambda group: (-sum(graph.sizes[p] for p in group), min(group))
    )
    left = room - len(large)
    if len(ranked) > left:
        spill = [path for group in ranked[max(left - 1, 0) :] for path in group]
        ranked = [*ranked[: left - 1], spill] if left > 0 else []
        if left == 0:  # no layer left for groups: they join the top one
            roots = roots + spill
    # Bottom first: the most depended on (shared libraries) lowest.
    popularity = {path: mask.bit_count() for path, mask in dependents.items()}
    bottom_up = sorted(
        [[path] for path in large] + ranked,
        key=lambda layer: (-max(popularity[p] for p in layer), min(layer)),
    )
    return [*bottom_up, roots]
