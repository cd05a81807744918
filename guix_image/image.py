"""The image model shared by every format: config JSON, layers and their digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

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

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"created": self.created}
        if self.created_by is not None:
            entry["created_by"] = self.created_by
        if self.comment is not None:
            entry["comment"] = self.comment
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


def is_sha256_digest(value: Any) -> TypeGuard[str]:
    """True for "sha256:" and 64 lowercase hex digits."""
    if not isinstance(value, str) or not value.startswith(SHA256_PREFIX):
        return False
    hex_part = value[len(SHA256_PREFIX) :]
    return len(hex_part) == 64 and all(c in "0123456789abcdef" for c in hex_part)


@dataclass
class LayerRef:
    """Where one layer of an image read from an archive is, and what the image says of it."""

    index: int  # from 1
    location: str  # archive member, or blob path in a layout
    size: int  # bytes as stored
    diff_id: str | None  # the config's rootfs.diff_ids entry
    digest: str | None = None  # the manifest descriptor's digest (OCI)
    media_type: str | None = None


@dataclass
class Expectation:
    """A fact an archive states about itself, to be checked against its bytes."""

    name: str
    expected: str
    actual: str

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


@dataclass
class ImageRecord:
    """One image found in an archive: its config and its layers."""

    format: str
    repo_tags: list[str]
    config_location: str
    config_bytes: bytes
    config: dict[str, Any]
    layers: list[LayerRef]
    # What the archive's own metadata says that can be checked without
    # reading layers: config digest against its name or descriptor, and so on.
    expectations: list[Expectation] = field(default_factory=list)
    config_digest: str = ""  # of config_bytes; computed if not given

    def __post_init__(self) -> None:
        if not self.config_digest:
            self.config_digest = SHA256_PREFIX + sha256_hex(self.config_bytes)

    @property
    def settings(self) -> dict[str, Any]:
        """The config's "config" object (Cmd, Env, ...), or {}."""
        settings = self.config.get("config")
        return settings if isinstance(settings, dict) else {}

    def layer_history(self) -> list[dict[str, Any]]:
        """The history entry of each layer, in order ({} when missing)."""
        entries = [
            h
            for h in self.config.get("history") or []
            if isinstance(h, dict) and not h.get("empty_layer")
        ]
        return [entries[i] if i < len(entries) else {} for i in range(len(self.layers))]
