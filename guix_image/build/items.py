"""`build STORE_ITEM...`: the closure of store items, layered, as a build config.

What the flags give becomes the reference script's JSON config (the one a
CONFIG file holds), so that `build --emit-config c.json ITEMS` and then
`build c.json` write the same bytes as `build ITEMS`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..store.closure import StoreGraph, closure_of
from ..store.database import StoreDatabase
from ..store.layering import DEFAULT_STRATEGY, plan_layers
from .config import ARCHITECTURE_HINTS, validate_config
from .customisation import write_customisation
from .plan import base_image

MAX_LAYERS = 125  # what docker and containerd accept
DEFAULT_MAX_LAYERS = 100
DEFAULT_CREATED = "1970-01-01T00:00:01Z"  # as nixpkgs: reproducible, and after the epoch


@dataclass
class ImageSettings:
    """What the flags say about the image (each None or empty: not given)."""

    tag: str | None = None
    entrypoint: str | None = None
    cmd: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    labels: list[str] = field(default_factory=list)
    user: str | None = None
    expose: list[str] = field(default_factory=list)
    architecture: str | None = None
    created: str | None = None
    mtime: str | None = None
    from_image: str | None = None
    symlinks: list[str] = field(default_factory=list)  # LINK=TARGET
    adds: list[str] = field(default_factory=list)  # SRC:DEST


@dataclass
class ItemsPlan:
    """The config to build, and how it came about (for --print-layers)."""

    document: dict[str, Any]
    graph: StoreGraph
    layers: list[list[str]]
    base_layers: int
    database: str | None  # the store database the closure came from, if one did


def plan_items(
    items: list[str],
    settings: ImageSettings,
    *,
    store_dir: str | None = None,
    database: str | None = None,
    references: str | None = None,
    max_layers: int = DEFAULT_MAX_LAYERS,
    strategy: str = DEFAULT_STRATEGY,
    root: str | None = None,
    customisation: str | None = None,
) -> ItemsPlan:
    """The closure of `items`, layered within `max_layers`, as a config document;
    with --symlink or --add, its customisation layer written into the directory
    `customisation`."""
    directory = store_dir or os.path.dirname(items[0])
    if any(os.path.dirname(item) != directory for item in items):
        raise InputError(f"the store items are not all in one store directory ({directory})")
    if not 1 <= max_layers <= MAX_LAYERS:
        raise InputError(f"--max-layers {max_layers}: from 1 to {MAX_LAYERS}, what loaders take")
    base = base_image(settings.from_image)
    base_layers = len(base.layers) if base is not None else 0
    customised = bool(settings.symlinks or settings.adds)
    if customised and customisation is None:
        raise ValueError("a directory for the customisation layer")
    budget = max_layers - base_layers - customised
    if budget < 1:
        raise InputError(
            f"--max-layers {max_layers}: the base image has {base_layers} layers already, "
            "and the store items need one more at least"
        )
    opened = None
    if references is None:
        opened = StoreDatabase(database) if database else StoreDatabase.find(directory, root)
    try:
        graph = closure_of(items, database=opened, references_file=references, root_dir=root)
    finally:
        if opened is not None:
            opened.close()
    layers = plan_layers(graph, budget, strategy)
    document = _document(settings, directory, layers, items)
    if customised and customisation is not None:
        mtime = validate_config(document, source="store items").mtime
        write_customisation(customisation, settings.symlinks, settings.adds, items[0], mtime)
        document["customisation_layer"] = customisation
    return ItemsPlan(document, graph, layers, base_layers, opened.path if opened else None)


def _document(
    settings: ImageSettings, store_dir: str, layers: list[list[str]], items: list[str]
) -> dict[str, Any]:
    created = settings.created or DEFAULT_CREATED
    config: dict[str, Any] = {}
    if settings.entrypoint is not None:
        config["Entrypoint"] = _command(settings.entrypoint, "--entrypoint")
    if settings.cmd is not None:
        config["Cmd"] = _command(settings.cmd, "--cmd")
    if settings.env:
        for value in settings.env:
            _pair(value, "--env")  # KEY=VALUE, or refused
        config["Env"] = list(settings.env)
    if settings.workdir is not None:
        config["WorkingDir"] = settings.workdir
    if settings.labels:
        config["Labels"] = dict(_pair(value, "--label") for value in settings.labels)
    if settings.user is not None:
        config["User"] = settings.user
    if settings.expose:
        config["ExposedPorts"] = {_port(value): {} for value in settings.expose}
    return {
        "architecture": settings.architecture or this_architecture(),
        "config": config,
        "created": created,
        "mtime": settings.mtime or created,
        "repo_tag": settings.tag or default_tag(items[0]),
        "store_dir": store_dir,
        "from_image": settings.from_image,
        "store_layers": layers,
        "customisation_layer": None,
    }


def _command(value: str, option: str) -> list[str]:
    """A JSON list (["/bin/sh", "-c", "..."]) or words as a shell splits them."""
    if value.lstrip().startswith("["):
        try:
            words = json.loads(value)
        except ValueError:
            words = None
        if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            raise InputError(f"{option} {value!r}: a JSON list of strings, or words")
        return words
    try:
        return shlex.split(value)
    except ValueError as error:
        raise InputError(f"{option} {value!r}: {error}") from None


def _pair(value: str, option: str) -> tuple[str, str]:
    key, equals, rest = value.partition("=")
    if not equals or not key:
        raise InputError(f"{option} {value!r}: give KEY=VALUE")
    return key, rest


def _port(value: str) -> str:
    number, _, protocol = value.partition("/")
    if not (number.isascii() and number.isdigit() and 0 < int(number) < 65536):
        raise InputError(f"--expose {value!r}: give PORT or PORT/tcp, PORT/udp")
    if protocol not in ("", "tcp", "udp", "sctp"):
        raise InputError(f"--expose {value!r}: the protocol is tcp, udp or sctp")
    return f"{int(number)}/{protocol or 'tcp'}"


def this_architecture() -> str:
    """This machine's architecture, as Go and OCI name it."""
    machine = platform.machine().lower()
    return ARCHITECTURE_HINTS.get(machine, machine)


def default_tag(item: str) -> str:
    """`hello:latest` for /gnu/store/<hash>-hello-2.12: the package's name."""
    name = os.path.basename(item).partition("-")[2]
    parts = name.split("-")
    while len(parts) > 1 and parts[-1][:1].isdigit():
        parts.pop()  # the version
    base = "-".join(parts).lower()
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip("._-")
    return f"{cleaned or 'image'}:latest"
