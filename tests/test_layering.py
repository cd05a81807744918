"""Closures and layering strategies against answers worked out by hand on small
graphs (a diamond, self-references, roots nothing refers to), and their bounds."""

from __future__ import annotations

import json
import random
import tempfile

import pytest

from guix_image.errors import InputError
from guix_image.store.closure import StoreGraph, closure_of
from guix_image.store.layering import STRATEGIES, plan_layers

S = "/gnu/store/"
APP, PY, LIB, LIBC = S + "a-app", S + "p-python", S + "l-lib", S + "c-libc"
SIZES = {APP: 5, PY: 50, LIB: 10, LIBC: 100}
REFS = {APP: [APP, PY, LIB], PY: [LIBC, LIB], LIB: [LIBC], LIBC: [LIBC]}  # with self-references


def graph_of(refs: dict[str, list[str]], roots: list[str], sizes: dict[str, int]) -> StoreGraph:
    """The closure, read from an exportReferencesGraph-style file of the graph."""
    document = [
        {
            "path": path,
            "references": references,
            **({"narSize": sizes[path]} if path in sizes else {}),
        }
        for path, references in refs.items()
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(document, file)
        file.flush()
        return closure_of(roots, references_file=file.name)


def test_a_closure_holds_every_item_reached_once_without_self_references() -> None:
    graph = graph_of(REFS, [APP], SIZES)
    assert graph.items == sorted([APP, PY, LIB, LIBC])
    assert graph.references[APP] == sorted([PY, LIB]) and graph.references[LIBC] == []
    with pytest.raises(InputError, match="c-libc: the store does not know this item"):
        graph_of({APP: [LIBC]}, [APP], {APP: 1})
    with pytest.raises(InputError, match="a cycle"):
        plan_layers(graph_of({APP: [LIB], LIB: [APP]}, [APP], SIZES), 2, "popularity")


@pytest.mark.parametrize(
    ("strategy", "budget", "expected"),
    [
        # popularity: libc is in 4 closures, lib 3, python 2, app 1.
        ("popularity", 1, [[APP, LIBC, LIB, PY]]),
        ("popularity", 2, [[LIBC], [APP, LIB, PY]]),
        ("popularity", 4, [[LIBC], [LIB], [PY], [APP]]),
        # size: libc 100, python 50, lib 10, app 5.
        ("size", 2, [[LIBC], [APP, LIB, PY]]),
        ("size", 3, [[LIBC], [PY], [APP, LIB]]),
        # auto: the largest alone, the given item on top, the rest grouped by
        # their dependents among the large (none here: python and lib together).
        ("auto", 1, [[APP, LIBC, LIB, PY]]),
        ("auto", 3, [[LIBC], [LIB, PY], [APP]]),
        ("auto", 10, [[LIBC], [LIB], [PY], [APP]]),
    ],
)
def test_strategies_give_the_layers_worked_out_by_hand(
    strategy: str, budget: int, expected: list[list[str]]
) -> None:
    layers = plan_layers(graph_of(REFS, [APP], SIZES), budget, strategy)
    assert layers == [sorted(layer) for layer in expected]


def test_auto_keeps_what_one_large_item_uses_with_nothing_else() -> None:
    """A diamond under two large items: what only one of them uses travels apart
    from what both use, so an update of one ships its own part alone."""
    refs = {
        APP: [S + "x-big1", S + "y-big2"],
        S + "x-big1": [S + "s-shared", S + "o-only1"],
        S + "y-big2": [S + "s-shared", S + "t-only2"],
        S + "s-shared": [],
        S + "o-only1": [],
        S + "t-only2": [],
    }
    sizes = dict.fromkeys(refs, 1) | {S + "x-big1": 1000, S + "y-big2": 900, APP: 2}
    layers = plan_layers(graph_of(refs, [APP], sizes), 6, "auto")
    assert [S + "o-only1"] in layers and [S + "t-only2"] in layers
    assert [S + "s-shared"] in layers and layers[-1] == [APP]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_within_budget_and_deterministic(strategy: str) -> None:
    chance = random.Random(5)
    paths = [f"{S}{n:04d}-item" for n in range(300)]
    refs = {
        p: chance.sample(paths[i + 1 :], min(3, len(paths) - i - 1)) for i, p in enumerate(paths)
    }
    sizes = {p: chance.randint(1, 10_000) for p in paths}
    graph = graph_of(refs, paths[:2], sizes)
    for budget in (1, 2, 7, 100, 1000):
        layers = plan_layers(graph, budget, strategy)
        assert 1 <= len(layers) <= budget
        assert sorted(p for layer in layers for p in layer) == graph.items
        assert plan_layers(graph_of(refs, paths[:2], sizes), budget, strategy) == layers
