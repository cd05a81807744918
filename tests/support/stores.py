"""Throwaway stores for the tests, and their build configs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from guix_image.build.engine import BuildResult

CREATED = "2024-01-02T03:04:05Z"

# The `build` fixture: a config document (and build_image's keywords) to (archive, result).
BuildFn = Callable[..., "tuple[Path, BuildResult]"]


class StoreTree:
    """A throwaway store: `<tmp>/gnu/store/<hash>-<name>` items, made by the tests."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.store_dir = base / "gnu" / "store"
        self.store_dir.mkdir(parents=True)

    def path(self, name: str) -> Path:
        hash_part = hashlib.sha256(name.encode()).hexdigest()[:32]
        return self.store_dir / f"{hash_part}-{name}"

    def item(self, name: str, files: dict[str, str | bytes] | None = None) -> Path:
        """A directory store item holding `files` (relative path -> content)."""
        top = self.path(name)
        top.mkdir(parents=True, exist_ok=True)
        for relative, content in (files or {}).items():
            target = top / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            target.write_bytes(data)
        return top

    def config(self, layers: list[list[Path | str]], **fields: Any) -> dict[str, Any]:
        document: dict[str, Any] = {
            "architecture": "amd64",
            "config": {},
            "created": CREATED,
            "repo_tag": "test/image:latest",
            "store_dir": str(self.store_dir),
            "from_image": None,
            "store_layers": [[str(p) for p in layer] for layer in layers],
            "customisation_layer": None,
        }
        document.update(fields)
        return document


def settle() -> None:
    """Let a new store age past the clock tick of a scan, so that member lists are kept.

    Where timestamps have whole seconds (not on the ext4 and tmpfs the tests
    run on) the margin is 2 s, and the tests that count lists would fail.
    """
    from guix_image.build import member_list

    time.sleep(member_list.RACY_NS / 1e9 + 0.02)


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


# -- what a layer must hold -------------------------------------------------------

Tree = dict[str, tuple[str, int, bytes]]


def populate(store: StoreTree) -> list[Path]:
    """Store items covering every kind of file and name the issue lists."""
    app = store.item(
        "app-1.0",
        {
            "bin/app": "#!/bin/sh\necho app\n",
            "share/empty-file": "",
            "share/" + "long-" * 30 + "name.txt": "over 100 bytes of path",
            "share/deep/" + "/".join(f"d{i}" for i in range(40)) + "/leaf": "deep",
            "share/caf\u00e9-\u65e5\u672c.txt": "utf-8 name",
        },
    )
    (app / "share" / "empty-dir").mkdir()
    os.chmod(app / "bin" / "app", 0o555)
    os.chmod(app / "share" / "empty-file", 0o444)
    (app / os.fsdecode(b"share/raw-\xff\xfe")).write_bytes(b"non-UTF-8 name")
    very_long = app / "share" / ("x" * 200)
    very_long.mkdir()
    (very_long / ("y" * 100)).write_text("over 255 bytes of path")
    (app / "bin" / "relative").symlink_to("app")
    (app / "bin" / "absolute").symlink_to(str(app / "bin" / "app"))
    (app / "bin" / "dangling").symlink_to("/gnu/store/nowhere")
    os.link(app / "bin" / "app", app / "bin" / "hardlink")

    data = store.path("data.json")
    data.write_text('{"a": 1}')
    alias = store.path("alias")
    alias.symlink_to(app)
    return [app, data, alias]


def disk_tree(paths: list[Path]) -> Tree:
    """What a layer of `paths` must contain, read from the disk."""
    tree: Tree = {}
    for top in paths:
        for path in [
            top,
            *(sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else []),
        ]:
            st = path.lstat()
            name = os.fsdecode(os.fsencode(path)).lstrip("/")
            if stat.S_ISLNK(st.st_mode):
                tree[name] = ("symlink", 0o777, os.fsencode(os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                tree[name] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                tree[name] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return tree


def rootfs_tree(rootfs: Path, paths: list[Path]) -> Tree:
    """The unpacked counterparts of `paths` under `rootfs`, in the shape of disk_tree."""
    inside = [Path(str(rootfs) + str(p)) for p in paths]
    tree = disk_tree(inside)
    prefix = str(rootfs).lstrip("/") + "/"
    return {name[len(prefix) :]: value for name, value in tree.items()}


def layer_tree(layer: bytes, skip: int) -> Tree:
    tree: Tree = {}
    with tarfile.open(fileobj=io.BytesIO(layer), encoding="utf-8", errors="surrogateescape") as tar:
        for member in tar.getmembers()[skip:]:
            if member.issym():
                tree[member.name] = ("symlink", member.mode, os.fsencode(member.linkname))
            elif member.isdir():
                tree[member.name] = ("dir", member.mode, b"")
            else:
                assert member.isreg(), member.name
                tree[member.name] = ("file", member.mode, tar.extractfile(member).read())  # type: ignore[union-attr]
    return tree


# -- store databases ----------------------------------------------------------------

# The tables of the Guix and Nix store database that verify --store reads.
SCHEMA = """
CREATE TABLE ValidPaths (
    id integer primary key autoincrement not null,
    path text unique not null,
    hash text not null,
    registrationTime integer not null,
    deriver text,
    narSize integer
);
CREATE TABLE Refs (
    referrer integer not null,
    reference integer not null,
    primary key (referrer, reference)
);
"""


def make_database(path: Path, items: dict[Path, str], refs: dict[Path, list[Path]]) -> Path:
    """A store database registering `items` (path -> NAR hash) and their references."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        ids = {}
        for item, digest in items.items():
            cursor = db.execute(
                "INSERT INTO ValidPaths (path, hash, registrationTime) VALUES (?, ?, 1)",
                (str(item), digest),
            )
            ids[item] = cursor.lastrowid
        for referrer, references in refs.items():
            for reference in references:
                db.execute("INSERT INTO Refs VALUES (?, ?)", (ids[referrer], ids[reference]))
    db.close()
    return path


# -- a store item that runs -------------------------------------------------------

BUSYBOX = "/bin/busybox"


def busybox_store(store: StoreTree) -> Path:
    """A store item holding Debian's static busybox: an image of it runs."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed (.ci/run installs it)")
    item = store.item("busybox-1.35")
    (item / "bin").mkdir()
    shutil.copy2(BUSYBOX, item / "bin" / "busybox")
    return item
