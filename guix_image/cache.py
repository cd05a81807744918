"""The layer cache: each store layer's size and digest, from an earlier build.

Store paths do not change once registered, so a layer's tar is determined by
its store paths, their identity (the NAR hash from the store database, or the
inode and times of each path) and every option that changes the bytes. The
key hashes all of that. An entry is only a prediction: the build still hashes
every byte and fails, dropping the entry, if the prediction was wrong.

Entries are small JSON files written atomically (temporary file + rename),
so builds running at once never see half an entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .image import canonical_json, sha256_hex

ENTRY_VERSION = 1
# Bump when the bytes written for the same inputs change (tar encoding, ordering...).
LAYER_FORMAT = "guix-image/layer-tar/1"

_DIFF_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "guix-image"


def cache_key(recipe: dict[str, Any]) -> str:
    return sha256_hex(canonical_json({"format": LAYER_FORMAT, **recipe}))


@dataclass(frozen=True)
class CachedLayer:
    size: int
    diff_id: str


class LayerCache:
    def __init__(self, directory: Path, warn: Callable[[str], None]) -> None:
        self.directory = directory / "layers"
        self._warn = warn
        self._writable = True

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> CachedLayer | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._warn(f"cannot read cache entry {path}: {error.strerror}; ignoring it")
            return None
        entry = _parse_entry(data, key)
        if entry is None:
            self._warn(f"ignoring unreadable cache entry {path}")
        return entry

    def put(self, key: str, layer: CachedLayer) -> None:
        if not self._writable:
            return
        document = {
            "version": ENTRY_VERSION,
            "key": key,
            "size": layer.size,
            "diff_id": layer.diff_id,
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".entry-", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(canonical_json(document))
                os.replace(temporary, self._path(key))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as error:
            self._writable = False
            self._warn(f"cannot write the layer cache in {self.directory}: {error.strerror}")

    def drop(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def _parse_entry(data: bytes, key: str) -> CachedLayer | None:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(document, dict) or document.get("version") != ENTRY_VERSION:
        return None
    size, diff_id = document.get("size"), document.get("diff_id")
    if (
        document.get("key") != key
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
    ):
        return None
    if not isinstance(diff_id, str) or not _DIFF_ID.match(diff_id):
        return None
    return CachedLayer(size, diff_id)
