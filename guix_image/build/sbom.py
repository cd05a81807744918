"""The image's software bill of materials: a CycloneDX 1.5 JSON document of the
store items in it, from the closure the build used.

Each item is a component: its name and version (parsed from the store name as
Nix's `parseDrvName` does: the version starts at the first dash followed by a
digit), its NAR hash where the store database knows it, its NAR size, and
what it refers to (the `dependencies`). The document is deterministic: no
clock (its timestamp is the image's `created`), a serial number derived
from its contents, everything sorted.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

from .. import __version__
from ..store.closure import StoreGraph
from ..store.database import StoreDatabase
from .output import write_atomically

SPEC_VERSION = "1.5"


def name_and_version(path: str) -> tuple[str, str]:
    """("hello", "2.12") for /gnu/store/<hash>-hello-2.12."""
    name = os.path.basename(path).partition("-")[2]
    parts = name.split("-")
    for number, part in enumerate(parts[1:], 1):
        if part[:1].isdigit():
            return "-".join(parts[:number]), "-".join(parts[number:])
    return name, ""


def sbom_document(
    graph: StoreGraph, document: dict[str, Any], database: StoreDatabase | None
) -> dict[str, Any]:
    """The SBOM of an image built from `graph` by the config `document`."""
    name, _, tag = str(document.get("repo_tag") or "image").rpartition(":")
    components = [_component(path, graph, database) for path in graph.items]
    dependencies = [{"ref": "image", "dependsOn": sorted(graph.roots)}] + [
        {"ref": path, "dependsOn": graph.references[path]} for path in graph.items
    ]
    body = {"components": components, "dependencies": dependencies}
    serial = uuid.uuid5(uuid.NAMESPACE_URL, "guix-image:" + _digest(body))
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            "timestamp": document["created"],
            "tools": {
                "components": [
                    {"type": "application", "name": "guix-image", "version": __version__}
                ]
            },
            "component": {
                "type": "container",
                "bom-ref": "image",
                "name": name or tag,
                **({"version": tag} if name else {}),
            },
        },
        **body,
    }


def _component(path: str, graph: StoreGraph, database: StoreDatabase | None) -> dict[str, Any]:
    name, version = name_and_version(path)
    component: dict[str, Any] = {"type": "library", "bom-ref": path, "name": name or path}
    if version:
        component["version"] = version
    nar_hash = database.nar_hash(path) if database is not None else None
    if nar_hash and nar_hash.startswith("sha256:") and len(nar_hash) == 7 + 64:
        component["hashes"] = [{"alg": "SHA-256", "content": nar_hash[7:]}]
    component["properties"] = [
        {"name": "guix-image:store-path", "value": path},
        {"name": "guix-image:nar-size", "value": str(graph.sizes[path])},
        *([{"name": "guix-image:nar-hash", "value": nar_hash}] if nar_hash else []),
    ]
    return component


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def write_sbom(path: str, sbom: dict[str, Any]) -> None:
    """Write it whole or not at all."""
    write_atomically(path, json.dumps(sbom, indent=2, ensure_ascii=True) + "\n")
