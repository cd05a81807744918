"""Store paths as strings: normalised, and where they lie."""

from __future__ import annotations

import posixpath


def is_inside(path: str, directory: str) -> bool:
    """True if normalised `path` lies strictly below normalised `directory`."""
    prefix = directory if directory.endswith("/") else directory + "/"
    return path.startswith(prefix) and len(path) > len(prefix)


def normalise_path(path: str) -> str:
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal
