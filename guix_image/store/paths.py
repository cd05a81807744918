"""Store paths as strings: normalised, and where they lie."""

from __future__ import annotations

import os
import posixpath


def is_inside(path: str, directory: str) -> bool:
    """True if normalised `path` lies strictly below normalised `directory`."""
    prefix = directory if directory.endswith("/") else directory + "/"
    return path.startswith(prefix) and len(path) > len(prefix)


def normalise_path(path: str) -> str:
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


STORE_DIRS = ("/gnu/store", "/nix/store")


def store_item(argument: str, store_dir: str | None) -> str | None:
    """The store item an argument names (a `result` link is followed once), or None
    if it is not one (then it is a CONFIG)."""
    candidate = argument
    if os.path.islink(argument):
        candidate = os.path.join(os.path.dirname(argument), os.readlink(argument))
    candidate = os.path.normpath(candidate)
    parent = os.path.dirname(candidate)
    if store_dir is not None:
        return candidate if parent == os.path.normpath(store_dir) else None
    # /gnu/store or /nix/store, or one under a prefix (a chroot store, a test's)
    return candidate if parent.endswith(STORE_DIRS) else None
