#!/usr/bin/env python3
"""The layering benchmark: what each strategy makes of realistic closures, and
what a registry receives after an update.

Graphs are generated, deterministic: a few hundred to a few thousand items,
sizes with a long tail, a libc and a language runtime that most items use,
libraries using each other, one application leaf. For each strategy:
the number of layers, the largest layer's share of the bytes, and the bytes
a registry must receive after (a) the application changes, (b) one library
in the middle of the graph changes, with everything that depends on it
(their store paths change too). An update is planned again from scratch,
and a layer is received unless the previous plan had one of exactly the same
items.

    python3 tests/bench/layering.py            # the table, and the targets PASS/FAIL
    python3 tests/bench/layering.py --json     # the numbers
    python3 tests/bench/layering.py --item $(guix build python)   # and a real closure

Targets for the default strategy: (a) at most the application's size plus
5 %; (b) no more than the best of popularity and size; the plan of a
5,000-item closure in under 0.2 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guix_image.store.closure import StoreGraph
from guix_image.store.layering import DEFAULT_STRATEGY, STRATEGIES, plan_layers

BUDGET = 100
GRAPHS = {"small": 300, "medium": 1200, "large": 3000}


def generated(items: int, seed: int) -> StoreGraph:
    """A closure of `items` items: libc at the bottom, a runtime above it, libraries
    using a few lower ones, and one application using some of everything."""
    chance = random.Random(seed)
    names = [f"/nix/store/{n:032d}-item-{n}" for n in range(items)]
    libc, runtime, app = names[0], names[1], names[-1]
    references: dict[str, list[str]] = {libc: []}
    references[runtime] = [libc]
    for number in range(2, items - 1):
        lower = names[1:number]
        picked = chance.sample(lower, min(len(lower), chance.randint(0, 4)))
        uses_runtime = chance.random() < 0.6
        references[names[number]] = sorted({libc, *picked, *([runtime] if uses_runtime else [])})
    references[app] = sorted({libc, runtime, *chance.sample(names[2:-1], min(items - 3, 25))})
    sizes = {path: int(2_000 * chance.paretovariate(1.2)) for path in names}
    sizes[libc], sizes[runtime] = 30_000_000, 120_000_000
    sizes[app] = 2_000_000
    return StoreGraph([app], references, sizes)


def dependents_of(graph: StoreGraph, changed: str) -> set[str]:
    """`changed` and everything that depends on it, directly or not."""
    parents: dict[str, list[str]] = {path: [] for path in graph.references}
    for path, refs in graph.references.items():
        for ref in refs:
            parents[ref].append(path)
    found, stack = set(), [changed]
    while stack:
        path = stack.pop()
        if path not in found:
            found.add(path)
            stack.extend(parents[path])
    return found


def updated(graph: StoreGraph, changed: set[str]) -> StoreGraph:
    """The same closure after a rebuild of `changed`: new store paths, same sizes."""

    def new(path: str) -> str:
        if path not in changed:
            return path
        digest = hashlib.sha256(path.encode()).hexdigest()[:32]
        return f"/nix/store/{digest}-{path.partition('-')[2]}"

    references = {new(p): [new(r) for r in refs] for p, refs in graph.references.items()}
    sizes = {new(p): size for p, size in graph.sizes.items()}
    return StoreGraph([new(r) for r in graph.roots], references, sizes)


def received(before: list[list[str]], after: list[list[str]], sizes: dict[str, int]) -> int:
    old = {frozenset(layer) for layer in before}
    return sum(sum(sizes[p] for p in layer) for layer in after if frozenset(layer) not in old)


def measure(graph: StoreGraph, strategy: str) -> dict[str, float]:
    started = time.perf_counter()
    layers = plan_layers(graph, BUDGET, strategy)
    seconds = time.perf_counter() - started
    total = sum(graph.sizes.values())
    largest = max(sum(graph.sizes[p] for p in layer) for layer in layers)
    app = graph.roots[0]
    after_app = updated(graph, {app})
    middle = sorted(graph.references)[len(graph.references) // 2]
    after_lib = updated(graph, dependents_of(graph, middle))
    return {
        "layers": len(layers),
        "largest_share": round(largest / total, 3),
        "app_update_bytes": received(
            layers, plan_layers(after_app, BUDGET, strategy), after_app.sizes
        ),
        "app_size": graph.sizes[app],
        "library_update_bytes": received(
            layers, plan_layers(after_lib, BUDGET, strategy), after_lib.sizes
        ),
        "plan_seconds": round(seconds, 4),
    }


def real_closure(item: str) -> StoreGraph:
    """The closure of a real store item, from its store's database (as build reads it)."""
    from guix_image.store.closure import closure_of
    from guix_image.store.database import StoreDatabase

    database = StoreDatabase.find(item.rsplit("/", 1)[0])
    if database is None:
        raise SystemExit(f"no store database for {item}")
    try:
        return closure_of([item], database=database)
    finally:
        database.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--item", action="append", default=[], help="also a real store item's closure"
    )
    args = parser.parse_args()
    graphs = {name: generated(items, seed=7) for name, items in GRAPHS.items()}
    graphs.update({item.rsplit("/", 1)[1]: real_closure(item) for item in args.item})
    results = {
        name: {strategy: measure(graph, strategy) for strategy in STRATEGIES}
        for name, graph in graphs.items()
    }
    started = time.perf_counter()
    plan_layers(generated(5000, seed=11), BUDGET, DEFAULT_STRATEGY)
    plan_5000 = time.perf_counter() - started
    if args.json:
        print(json.dumps({"graphs": results, "plan_5000_seconds": plan_5000}, indent=2))
    else:
        print("| graph | strategy | layers | largest | app update | library update | plan s |")
        print("|---|---|---|---|---|---|---|")
        for name, by_strategy in results.items():
            for strategy, m in by_strategy.items():
                print(
                    f"| {name} | {strategy} | {m['layers']} | {m['largest_share']:.1%} | "
                    f"{m['app_update_bytes'] / 1e6:.1f} MB | "
                    f"{m['library_update_bytes'] / 1e6:.1f} MB | {m['plan_seconds']} |"
                )
    verdicts = []
    for name, by_strategy in results.items():
        default = by_strategy[DEFAULT_STRATEGY]
        limit = default["app_size"] * 1.05
        verdicts.append(
            (f"{name}: app update <= app size + 5 %", default["app_update_bytes"] <= limit)
        )
        best = min(by_strategy[s]["library_update_bytes"] for s in ("popularity", "size"))
        verdicts.append(
            (
                f"{name}: library update <= best of popularity and size",
                default["library_update_bytes"] <= best,
            )
        )
    verdicts.append((f"plan of 5,000 items < 0.2 s ({plan_5000:.3f} s)", plan_5000 < 0.2))
    for label, ok in verdicts:
        print(
            f"- {'PASS' if ok else 'FAIL'}: {label}", file=sys.stderr if args.json else sys.stdout
        )
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
