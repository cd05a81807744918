"""Scanning store paths: order, ancestors, nesting, and what is refused."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from guix_image.errors import InputError
from guix_image.store.walk import Store
from guix_image.tar.format import DIRTYPE, REGTYPE, SYMTYPE

from .support.stores import StoreTree


def names(store: StoreTree, paths: list[Path]) -> list[str]:
    scanner = Store(str(store.store_dir))
    entries = list(scanner.iter_layer([str(p) for p in paths], "layer"))
    return [e.name.decode("utf-8", "surrogateescape") for e in entries]


def rel(store: StoreTree, path: Path) -> str:
    return str(path).lstrip("/")


def test_store_dir_ancestors_come_first_with_mode_0555(store: StoreTree) -> None:
    item = store.item("a", {"f": "x"})
    scanner = Store(str(store.store_dir))
    entries = list(scanner.iter_layer([str(item)], "layer"))
    parts = str(store.store_dir).strip("/").split("/")
    expected = ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]
    assert [e.name.decode() for e in entries[: len(parts)]] == expected
    assert all(e.typeflag == DIRTYPE and e.mode == 0o555 for e in entries[: len(parts)])


def test_gnu_store_gives_gnu_and_gnu_store() -> None:
    assert [e.name for e in Store("/gnu/store").store_dir_entries()] == [b"gnu/", b"gnu/store/"]
    assert [e.name for e in Store("/nix/store").store_dir_entries()] == [b"nix/", b"nix/store/"]


def test_tree_order_is_bytewise_by_component(store: StoreTree) -> None:
    item = store.item("t", {"a/x": "1", "a-c": "2", "B": "3", "a/b/y": "4", "\u00e9": "5"})
    listing = names(store, [item])
    prefix = rel(store, item)
    assert listing[-8:] == [
        f"{prefix}/",
        f"{prefix}/B",
        f"{prefix}/a/",
        f"{prefix}/a/b/",
        f"{prefix}/a/b/y",
        f"{prefix}/a/x",
        f"{prefix}/a-c",
        f"{prefix}/\u00e9",  # 0xC3 sorts after ASCII
    ]


def test_store_paths_in_a_layer_are_sorted_and_deduplicated(store: StoreTree) -> None:
    b = store.item("b", {"f": "1"})
    a = store.item("a", {"f": "2"})
    listing = names(store, [b, a, b, a / "f"])
    assert listing.count(f"{rel(store, a)}/f") == 1
    assert listing.count(f"{rel(store, b)}/") == 1
    tops = [n for n in listing if n.count("/") == rel(store, a).count("/") + 1 and n.endswith("/")]
    assert tops == sorted(tops, key=lambda n: n.encode())


def test_nested_store_path_gets_its_parent_directories(store: StoreTree) -> None:
    item = store.item("n", {"bin/tool": "#!", "lib/x": "1"})
    listing = names(store, [item / "bin"])
    assert listing[-3:] == [
        f"{rel(store, item)}/",
        f"{rel(store, item)}/bin/",
        f"{rel(store, item)}/bin/tool",
    ]


def test_symlinks_are_not_followed(store: StoreTree) -> None:
    target = store.item("target", {"secret": "s"})
    link = store.path("link")
    link.symlink_to(target)
    scanner = Store(str(store.store_dir))
    entries = list(scanner.iter_layer([str(link)], "layer"))
    assert entries[-1].typeflag == SYMTYPE
    assert entries[-1].linkname == os.fsencode(target)
    assert not any(e.name.endswith(b"secret") for e in entries)


def test_file_store_path(store: StoreTree) -> None:
    path = store.path("file")
    path.write_text("content")
    entries = list(Store(str(store.store_dir)).iter_layer([str(path)], "layer"))
    assert entries[-1].typeflag == REGTYPE and entries[-1].size == 7


def test_missing_store_path_names_path_and_layer(store: StoreTree) -> None:
    with pytest.raises(
        InputError, match=r"^store_layers\[1\]\[0\]: store path .*-missing does not exist"
    ):
        Store(str(store.store_dir)).check_path(str(store.path("missing")), "store_layers[1][0]")


def test_path_below_a_symlink_is_refused(store: StoreTree, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    store.path("escape").symlink_to(outside)
    with pytest.raises(InputError, match="which is not a directory"):
        Store(str(store.store_dir)).check_path(str(store.path("escape") / "etc"), "where")


def test_fifo_is_refused_by_name(store: StoreTree) -> None:
    item = store.item("fifo")
    os.mkfifo(item / "pipe")
    with pytest.raises(InputError, match=r"layer: .*/pipe is a fifo; an image layer holds only"):
        list(Store(str(store.store_dir)).iter_layer([str(item)], "layer"))


def test_socket_is_refused_by_name(store: StoreTree, monkeypatch: pytest.MonkeyPatch) -> None:
    item = store.item("sock")
    monkeypatch.chdir(item)  # a relative name keeps within AF_UNIX's path length limit
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s")
        with pytest.raises(InputError, match=r"/s is a socket"):
            list(Store(str(store.store_dir)).iter_layer([str(item)], "layer"))


def test_root_reads_a_chroot_store(tmp_path: Path) -> None:
    root = tmp_path / "chroot"
    (root / "gnu/store/abc-x").mkdir(parents=True)
    (root / "gnu/store/abc-x/f").write_text("hi")
    scanner = Store("/gnu/store", root=str(root))
    scanner.check_path("/gnu/store/abc-x", "here")
    entries = list(scanner.iter_layer(["/gnu/store/abc-x"], "here"))
    assert [e.name for e in entries] == [
        b"gnu/",
        b"gnu/store/",
        b"gnu/store/abc-x/",
        b"gnu/store/abc-x/f",
    ]
    with pytest.raises(InputError, match=r"does not exist \(under root "):
        scanner.check_path("/gnu/store/zzz-y", "here")
