"""The image model shared by every format: config JSON, layers and their digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SHA256_PREFIX = "sha256:"


def canonical_json(document: Any) -> bytes:
    """JSON bytes that depend only on the document: sorted keys, no spaces."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def merge_env(base: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """Base variables first, each replaced by a later one of the same name."""
    merged: dict[str, str] = {}
    for entry in [*base, *overrides]:
        merged[entry.split("=", 1)[0]] = entry
    return list(merged.values())


@dataclass
class HistoryEntry:
    created: str
    created_by: str | None = None
    comment: str | None = None
    empty_layer: bool = False

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"created": self.created}
        if self.created_by is not None:
            entry["created_by"] = self.created_by
        if self.comment is not None:
            entry["comment"] = self.comment
        if self.empty_layer:
            entry["empty_layer"] = True
        return entry


@dataclass
class ImageConfig:
    """What goes into the image config JSON (Docker v1.2 / OCI image config)."""

    architecture: str
    os: str
    created: str
    config: dict[str, Any]
    diff_ids: list[str] = field(default_factory=list)
    # Entries carried over from a base image stay as they were.
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "config": self.config,
            "created": self.created,
            "history": self.history,
            "os": self.os,
            "rootfs": {"diff_ids": self.diff_ids, "type": "layers"},
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())
