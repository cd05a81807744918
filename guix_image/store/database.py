"""The store database of Guix (`/var/guix/db/db.sqlite`) or Nix (`/nix/var/nix/db/db.sqlite`).

Read-only: it tells us a registered path's NAR hash (what identifies its
contents) without reading the path, and the paths it refers to (`Refs`).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

# Where each store keeps its database, relative to the prefix of its store dir.
_DATABASES = {
    "/gnu/store": "/var/guix/db/db.sqlite",
    "/nix/store": "/nix/var/nix/db/db.sqlite",
}


class StoreDatabase:
    def __init__(self, path: str) -> None:
        self.path = path
        self._connection = _connect_read_only(path)

    @classmethod
    def find(cls, store_dir: str, root: str | None = None) -> StoreDatabase | None:
        """The database that goes with `store_dir`, if there is one we can read."""
        for suffix, database in _DATABASES.items():
            if store_dir == suffix or store_dir.endswith(suffix):
                prefix = (root or "").rstrip("/") + store_dir[: -len(suffix)]
                path = prefix + database
                if os.path.isfile(path):
                    try:
                        return cls(path)
                    except sqlite3.Error:
                        return None
        return None

    def nar_hash(self, path: str) -> str | None:
        """The registered NAR hash of a store path ("sha256:..."), or None."""
        try:
            row = self._connection.execute(
                "SELECT hash FROM ValidPaths WHERE path = ?", (path,)
            ).fetchone()
        except sqlite3.Error:
            return None
        return row[0] if row and isinstance(row[0], str) else None

    def nar_size(self, path: str) -> int | None:
        """The registered NAR size of a store path, or None."""
        try:
            row = self._connection.execute(
                "SELECT narSize FROM ValidPaths WHERE path = ?", (path,)
            ).fetchone()
        except sqlite3.Error:
            return None
        return row[0] if row and isinstance(row[0], int) and row[0] >= 0 else None

    def references(self, path: str) -> list[str] | None:
        """The store paths `path` refers to (itself, too, if it does), or None if the
        database does not know `path`."""
        try:
            known = self._connection.execute(
                "SELECT id FROM ValidPaths WHERE path = ?", (path,)
            ).fetchone()
            if known is None:
                return None
            rows = self._connection.execute(
                "SELECT path FROM Refs JOIN ValidPaths ON ValidPaths.id = Refs.reference "
                "WHERE Refs.referrer = ?",
                (known[0],),
            ).fetchall()
        except sqlite3.Error:
            return None
        return sorted(row[0] for row in rows if isinstance(row[0], str))

    def close(self) -> None:
        self._connection.close()


def _connect_read_only(path: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path))
    # A database we cannot write (another user's store) cannot take locks
    # either; "immutable" tells SQLite not to try.
    writable = os.access(path, os.W_OK) and os.access(os.path.dirname(path), os.W_OK)
    connection = sqlite3.connect(uri + ("?mode=ro" if writable else "?immutable=1"), uri=True)
    # Fails now if it is not a store database; count(*) would read all of it.
    connection.execute("SELECT 1 FROM ValidPaths LIMIT 1").fetchone()
    return connection
