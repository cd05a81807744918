"""The closure of store items: every item they refer to, directly or not.

Read, in this order of preference, from the store's database (read-only),
from an `exportReferencesGraph`-style JSON file (a list of objects with
`path`, `references` and optionally `narSize`), or from `nix-store` /
`guix gc` when neither is there. An item the source does not know is an
error naming it. Sizes are the NAR sizes where known, else what the files
take (the sum of their sizes).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import strict_json
from ..errors import InputError
from ..files import read_regular
from .database import StoreDatabase


@dataclass
class StoreGraph:
    """Items of a closure, the items each refers to (itself excluded), their sizes."""

    roots: list[str]
    references: dict[str, list[str]]
    sizes: dict[str, int]

    @property
    def items(self) -> list[str]:
        return sorted(self.references)


def closure_of(
    roots: list[str],
    *,
    database: StoreDatabase | None = None,
    references_file: str | None = None,
    root_dir: str | None = None,
) -> StoreGraph:
    """The closure of `roots`, from the first source there is (see above)."""
    if references_file is not None:
        known = _from_references_file(references_file)
    elif database is not None:
        known = _Source(database.references, database.nar_size)
    else:
        known = _from_tools()
    references: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    pending = list(dict.fromkeys(roots))
    while pending:
        path = pending.pop()
        if path in references:
            continue
        found = known.references(path)
        if found is None:
            raise InputError(f"{path}: the store does not know this item (not in its database)")
        references[path] = sorted(set(found) - {path})
        size = known.size(path)
        sizes[path] = size if size is not None else _disk_size((root_dir or "") + path)
        pending.extend(ref for ref in references[path] if ref not in references)
    return StoreGraph(list(dict.fromkeys(roots)), references, sizes)


@dataclass
class _Source:
    """Where references and sizes come from: None for an item it does not know."""

    references: Callable[[str], list[str] | None]
    size: Callable[[str], int | None]


def _from_references_file(path: str) -> _Source:
    where = f"--references {path}"
    try:
        document = strict_json.loads(read_regular(path, 256 << 20))
    except OSError as error:
        raise InputError(f"{where}: {error.strerror}") from None
    except strict_json.JSONRefused as error:
        raise InputError(f"{where}: not valid JSON: {error}") from None
    if not isinstance(document, list):
        raise InputError(f"{where}: a list of {{path, references, narSize}} objects is expected")
    references: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for number, entry in enumerate(document):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("references"), list)
            and all(isinstance(r, str) for r in entry["references"])
        ):
            raise InputError(f"{where}: [{number}] is not {{path, references: [...]}}")
        references[entry["path"]] = list(entry["references"])
        nar_size = entry.get("narSize")
        if isinstance(nar_size, int) and not isinstance(nar_size, bool) and nar_size >= 0:
            sizes[entry["path"]] = nar_size
    return _Source(references.get, sizes.get)


def _from_tools() -> _Source:
    """`nix-store -q --references` (or Guix's `guix gc --references`), one item at a time."""
    if shutil.which("nix-store"):
        command = ["nix-store", "-q", "--references"]
    elif shutil.which("guix"):
        command = ["guix", "gc", "--references"]
    else:
        raise InputError(
            "no store database found and neither nix-store nor guix on PATH: "
            "give the database with --db or the references with --references FILE"
        )

    def references(path: str) -> list[str] | None:
        done = subprocess.run([*command, path], capture_output=True, text=True)
        return done.stdout.split() if done.returncode == 0 else None

    return _Source(references, lambda path: None)


def _disk_size(path: str) -> int:
    """The bytes of the files under `path`, links not followed."""
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            info = os.lstat(current)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            with os.scandir(current) as entries:
                stack.extend(entry.path for entry in entries)
        elif stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total


def ancestors(graph: StoreGraph) -> dict[str, int]:
    """Each item's dependents, itself included, as a bitset over `graph.items`
    (bit i for items[i]): the items whose closure holds it."""
    items = graph.items
    bit = {path: 1 << number for number, path in enumerate(items)}
    dependents: dict[str, list[str]] = {path: [] for path in items}
    for path, refs in graph.references.items():
        for ref in refs:
            dependents[ref].append(path)
    result: dict[str, int] = {}
    for path in _dependents_first(items, dependents):
        mask = bit[path]
        for parent in dependents[path]:
            mask |= result[parent]
        result[path] = mask
    return result


def _dependents_first(items: Iterable[str], dependents: dict[str, list[str]]) -> list[str]:
    """Items ordered so that every item comes after all that depend on it (Kahn's
    algorithm; store graphs have no cycles but self-references, removed already)."""
    waiting = {path: len(parents) for path, parents in dependents.items()}
    children: dict[str, list[str]] = {path: [] for path in dependents}
    for path, parents in dependents.items():
        for parent in parents:
            children[parent].append(path)
    ready = sorted(path for path, count in waiting.items() if count == 0)
    order = []
    while ready:
        path = ready.pop()
        order.append(path)
        for child in children[path]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if len(order) != len(waiting):
        raise InputError("the references form a cycle; a store closure cannot")
    return order
