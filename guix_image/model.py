"""The image model: what every reader produces and every writer consumes.

An image is a config plus ordered layers. A layer is an uncompressed tar
(its digest is the diff_id) stored as a blob (its digest and size, the
same as the tar's when it is not compressed), with a way to stream the
tar's bytes. Readers (`formats/`) give layers whose digests an archive
*states*; the build (`build/`) gives layers whose digests are only known
once they have streamed. Writers (`formats/docker_archive.py` today, an
OCI layout and a registry next) take either kind through the same calls:

    digest = layer.stream(out, progress)   # a PendingDigest
    out.drain()                            # now every digest is final
    measured = digest.result()             # a Measured: digest, size, ...

`out` is a `TarSink`: the speed machinery (`fastpath/`) is one, and a
writer never needs to know which.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeGuard, TypeVar

from .errors import InputError

SHA256_PREFIX = "sha256:"

# Called with the number of bytes of a layer written so far.
Progress = Callable[[int], None]


def sha256_digest(data: bytes) -> str:
    """The "sha256:<hex>" digest of `data`."""
    return SHA256_PREFIX + hashlib.sha256(data).hexdigest()


def is_sha256_digest(value: Any) -> TypeGuard[str]:
    """True for "sha256:" and 64 lowercase hex digits."""
    if not isinstance(value, str) or not value.startswith(SHA256_PREFIX):
        return False
    hex_part = value[len(SHA256_PREFIX) :]
    return len(hex_part) == 64 and all(c in "0123456789abcdef" for c in hex_part)


def canonical_json(document: Any) -> bytes:
    """JSON bytes that depend only on the document: sorted keys, no spaces."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


# -- streaming ----------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What streaming a span of bytes measured."""

    digest: str  # "sha256:<hex>"
    size: int
    # SHA-256 states taken on the way, kept by the cache so that a rebuild
    # can check the same bytes on several cores (see fastpath/sha256.py).
    checkpoints: bytes = b""
    # The bytes missed a checkpoint given in advance: they are not the bytes
    # those checkpoints were taken of.
    broken: bool = False


class PendingDigest(Protocol):
    """A digest that is only known once the stream it was taken on is drained."""

    def result(self) -> Measured:
        """The measurement; RuntimeError if the stream was not drained since."""
        ...


class TarSink(Protocol):
    """Where a layer's tar goes: a byte stream that hashes the spans it is asked to."""

    @property
    def position(self) -> int:
        """Bytes accepted so far."""
        ...

    def write(self, data: bytes | memoryview) -> None: ...

    def write_zeros(self, count: int) -> None: ...

    def write_file(
        self, header: bytes | memoryview, path: bytes, size: int, mode: int | None = None
    ) -> None:
        """A tar member: `header`, the `size` bytes of the file at `path`, padding.

        Raises SourceError if the file cannot be read, FileChanged if it is
        not `size` bytes long or (given `mode`) not a regular file with
        those permission bits.
        """
        ...

    def copy_from_fd(self, fd: int, size: int, name: str, *, at_eof: bool = True) -> None:
        """Exactly `size` bytes from `fd`'s offset (FileChanged if fewer, or more at EOF)."""
        ...

    def begin_digest(self, checkpoints: bytes = b"") -> PendingDigest:
        """Hash everything written from now until `end_digest`.

        `checkpoints`: those of the same bytes, if known (a rebuild).
        """
        ...

    def end_digest(self) -> PendingDigest: ...


# -- the model ------------------------------------------------------------------


class Layer:
    """One layer of an image.

    The digests are what is stated before the bytes are read: by an
    archive's config and manifest, a cache entry or a checksum file; None
    when only streaming will tell. Subclasses say how big the tar is and
    how to write it.
    """

    description: str = ""  # one line, for progress and messages
    comment: str = ""  # history comment, for a layer the build adds
    media_type: str | None = None  # of the blob, when an archive states one
    diff_id: str | None = None  # sha256 of the uncompressed tar
    digest: str | None = None  # sha256 of the blob as stored
    size: int | None = None  # bytes of the blob as stored
    checkpoints: bytes = b""  # of the uncompressed tar, if known (see Measured)

    def predicted(self) -> Measured | None:
        """What streaming the tar would measure, as an earlier build recorded it
        (a cache entry), if known."""
        return None

    def known_blob(self, label: str) -> tuple[str, int] | None:
        """The digest and size of the blob an earlier build compressed this layer
        into with the compressor `label` names (see formats/compression.py), if known."""
        return None

    def tar_size(self) -> int:
        """The uncompressed tar's size, found as cheaply as can be (and kept)."""
        raise NotImplementedError

    def write_tar(self, out: TarSink, progress: Progress) -> None:
        """Write the uncompressed tar, exactly `tar_size()` bytes."""
        raise NotImplementedError

    def stream(self, out: TarSink, progress: Progress) -> PendingDigest:
        """Write the tar to `out`, hashed: its digest is final once `out` drains."""
        digest = out.begin_digest(self.checkpoints)
        self.write_tar(out, progress)
        out.end_digest()
        return digest

    def check(self, measured: Measured, number: int) -> None:
        """Fail unless the bytes streamed are those stated (this is layer `number`)."""
        if self.diff_id is not None and self.diff_id != measured.digest:
            raise InputError(  # a broken base image or customisation layer
                f"layer {number} ({self.description}) has digest {measured.digest}, "
                f"but {self.diff_id} was expected"
            )


@dataclass
class Check:
    """A fact checked: what was expected, what was found, and whether that will do."""

    name: str
    ok: bool
    expected: str
    actual: str

    @classmethod
    def equal(cls, name: str, expected: str, actual: str) -> Check:
        return cls(name, expected == actual, expected, actual)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "expected": self.expected, "actual": self.actual}


LayerT = TypeVar("LayerT", bound=Layer)


@dataclass
class Image(Generic[LayerT]):
    """An image: its config and its layers, as an archive holds them."""

    format: str
    repo_tags: list[str]
    config_bytes: bytes
    config: dict[str, Any]
    layers: list[LayerT]
    config_location: str = ""  # the member or blob that holds the config
    # What the archive's own metadata says that can be checked without
    # reading layers: config digest against its name or descriptor, and so on.
    checks: list[Check] = field(default_factory=list)
    config_digest: str = ""  # of config_bytes; computed if not given
    # The manifest that lists it, as stored (OCI), and its media type: what a
    # push sends, byte for byte.
    manifest: bytes | None = None
    manifest_media_type: str | None = None

    def __post_init__(self) -> None:
        if not self.config_digest:
            self.config_digest = sha256_digest(self.config_bytes)

    @property
    def settings(self) -> dict[str, Any]:
        """The config's "config" object (Cmd, Env, ...), or {}."""
        settings = self.config.get("config")
        return settings if isinstance(settings, dict) else {}

    @property
    def diff_ids(self) -> list[str]:
        """The config's rootfs.diff_ids (readers check that there is such a list)."""
        diff_ids: list[str] = self.config["rootfs"]["diff_ids"]
        return diff_ids

    def layer_history(self) -> list[dict[str, Any]]:
        """The history entry of each layer, in order ({} when missing)."""
        entries = [
            h
            for h in self.config.get("history") or []
            if isinstance(h, dict) and not h.get("empty_layer")
        ]
        return [entries[i] if i < len(entries) else {} for i in range(len(self.layers))]


# -- the config a build writes --------------------------------------------------


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
