"""The layer cache: same bytes cold, warm and without it; never trusted blindly."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guix_image import sha256
from guix_image.cache import CachedLayer, LayerCache, cache_key
from guix_image.cli import main

from .conftest import StoreTree, settle, write_config

GUIX_IMAGE = [sys.executable, "-m", "guix_image"]


def entries(cache: Path) -> list[Path]:
    layers = cache / "layers"
    return sorted(layers.glob("*.json")) if layers.exists() else []


def member_lists(cache: Path) -> list[Path]:
    layers = cache / "layers"
    return sorted(layers.glob("*.members")) if layers.exists() else []


def build(config: Path, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["build", str(config), "-o", str(output), *extra])
    return result.exit_code, result.stderr


def fails_once(config: Path, output: Path, fresh: Path) -> None:
    """The build fails, leaves no output and drops the entry; the next is a fresh build's twin."""
    code, stderr = build(config, output)
    assert code == 1
    assert "the store paths changed since this layer was cached" in stderr
    assert "the cache entry is dropped, run the build again" in stderr
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")] == []
    assert build(config, output)[0] == 0  # the entry is gone: a cold build succeeds
    assert build(config, fresh, "--no-cache")[0] == 0
    assert output.read_bytes() == fresh.read_bytes()


@pytest.fixture
def image_config(store: StoreTree, tmp_path: Path) -> tuple[StoreTree, Path]:
    a = store.item("a", {"bin/a": "#!/bin/sh\n", "share/doc/a.txt": "A" * 5000})
    b = store.item("b", {"lib/b.so": os.urandom(300_000).hex()})
    settle()  # old enough for member lists
    return store, write_config(tmp_path / "c.json", store.config([[a], [b], [a, b]]))


def test_cold_warm_and_no_cache_give_the_same_bytes(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    outputs = {name: tmp_path / f"{name}.tar" for name in ("cold", "warm", "none")}
    assert build(config, outputs["cold"])[0] == 0
    assert len(entries(private_cache)) == 3
    code, stderr = build(config, outputs["warm"], "-v")
    assert code == 0
    assert stderr.count("(cached digest confirmed, files from the cached member list)") == 3
    assert build(config, outputs["none"], "--no-cache")[0] == 0
    data = {name: path.read_bytes() for name, path in outputs.items()}
    assert data["cold"] == data["warm"] == data["none"]


def test_no_cache_neither_reads_nor_writes(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    assert build(config, tmp_path / "o.tar", "--no-cache")[0] == 0
    assert entries(private_cache) == []


def test_entries_are_keyed_by_everything_that_changes_the_bytes(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    document = json.loads(config.read_text())
    assert build(config, tmp_path / "1.tar")[0] == 0
    first = set(entries(private_cache))
    for change in ({"mtime": "2001-01-01T00:00:00Z"}, {"uid": 1000}, {"gname": "users"}):
        changed = write_config(tmp_path / "changed.json", {**document, **change})
        assert build(changed, tmp_path / "2.tar")[0] == 0
    assert len(set(entries(private_cache)) - first) == 9


def test_an_unreadable_entry_is_ignored_with_a_warning(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    assert build(config, tmp_path / "1.tar")[0] == 0
    for entry in entries(private_cache):
        entry.write_text("{not json")
    code, stderr = build(config, tmp_path / "2.tar")
    assert code == 0
    assert stderr.count("warning: ignoring unreadable cache entry") == 3
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    for entry in entries(private_cache):
        assert json.loads(entry.read_text())["version"] == 1  # rewritten


@pytest.mark.parametrize("change", ["same size", "bigger", "smaller"])
def test_a_wrong_prediction_fails_drops_the_entry_and_leaves_no_output(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path, change: str
) -> None:
    store, config = image_config
    assert build(config, tmp_path / "1.tar")[0] == 0
    # Edit a file deep inside a store item: the item's own inode and times
    # stay the same, so the cache key does too. Only hashing can tell.
    doc = store.path("a") / "share" / "doc" / "a.txt"
    doc.write_text({"same size": "B" * 5000, "bigger": "B" * 9000, "smaller": "B"}[change])
    fails_once(config, tmp_path / "2.tar", tmp_path / "3.tar")


def test_two_builds_at_once_share_the_cache(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    env = {**os.environ, "XDG_CACHE_HOME": str(private_cache.parent)}
    processes = [
        subprocess.Popen(
            [*GUIX_IMAGE, "build", "-q", str(config), "-o", str(tmp_path / f"{i}.tar")], env=env
        )
        for i in range(4)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0, 0, 0, 0]
    outputs = {(tmp_path / f"{i}.tar").read_bytes() for i in range(4)}
    assert len(outputs) == 1
    assert len(entries(private_cache)) == 3
    assert len(member_lists(private_cache)) == 3
    assert not [p for p in (private_cache / "layers").iterdir() if p.name.startswith(".")]


def test_an_unwritable_cache_only_warns(
    image_config: tuple[StoreTree, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, config = image_config
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    code, stderr = build(config, tmp_path / "o.tar")
    assert code == 0
    assert stderr.count("warning: cannot write the layer cache") == 1


def make_database(path: Path, hashes: dict[str, str]) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement,"
            " path text unique not null, hash text not null,"
            " registrationTime integer not null, deriver text, narSize integer)"
        )
        for store_path, nar_hash in hashes.items():
            db.execute(
                "INSERT INTO ValidPaths (path, hash, registrationTime, narSize)"
                " VALUES (?, ?, 1, 1)",
                (store_path, nar_hash),
            )
    db.close()


def test_the_store_database_identifies_store_paths(
    store: StoreTree, tmp_path: Path, private_cache: Path
) -> None:
    item = store.item("db-item", {"f": "x"})
    database = store.base / "var" / "guix" / "db" / "db.sqlite"
    make_database(database, {str(item): "sha256:" + "1" * 64})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    assert build(config, tmp_path / "1.tar")[0] == 0
    [entry] = entries(private_cache)
    os.utime(item, (1, 1))  # new times on the store path: the NAR hash still says "same"
    assert build(config, tmp_path / "2.tar")[0] == 0
    assert entries(private_cache) == [entry]
    with sqlite3.connect(database) as db:
        db.execute("UPDATE ValidPaths SET hash = ?", ("sha256:" + "2" * 64,))
    db.close()
    assert build(config, tmp_path / "3.tar")[0] == 0
    assert len(entries(private_cache)) == 2  # a new NAR hash: a new key


def test_cache_keys_depend_on_the_recipe() -> None:
    assert cache_key({"paths": ["/gnu/store/a"]}) != cache_key({"paths": ["/gnu/store/b"]})
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})


def test_entries_are_validated(tmp_path: Path) -> None:
    warnings: list[str] = []
    cache = LayerCache(tmp_path, warnings.append)
    key = cache_key({"x": 1})
    (tmp_path / "layers").mkdir()
    for bad in (
        {"version": 1, "key": "other", "size": 1, "diff_id": "sha256:" + "0" * 64},
        {"version": 1, "key": key, "size": -1, "diff_id": "sha256:" + "0" * 64},
        {"version": 1, "key": key, "size": 1, "diff_id": "md5:00"},
        {"version": 2, "key": key, "size": 1, "diff_id": "sha256:" + "0" * 64},
    ):
        (tmp_path / "layers" / f"{key}.json").write_text(json.dumps(bad))
        assert cache.get(key) is None
    assert len(warnings) == 4


# -- checkpoints: a rebuild's digests checked on several cores ------------------


@pytest.fixture
def small_interval(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sha256, "CHECKPOINT_INTERVAL", 4096)
    return 4096


def checkpointed(cache: Path) -> dict[Path, dict[str, Any]]:
    """The entries that have checkpoints, and their documents."""
    documents = {path: json.loads(path.read_text()) for path in entries(cache)}
    return {path: doc for path, doc in documents.items() if "checkpoints" in doc}


@pytest.mark.usefixtures("small_interval")
def test_a_first_build_records_checkpoints_and_a_rebuild_uses_them(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    assert build(config, tmp_path / "cold.tar")[0] == 0
    recorded = checkpointed(private_cache)
    assert len(recorded) == 3  # every layer is longer than one interval
    for document in recorded.values():
        states = document["checkpoints"]["states"]
        assert document["checkpoints"]["interval"] == 4096
        assert len(states) == 64 * sha256.checkpoint_count(document["size"])
    before = {path: path.read_bytes() for path in entries(private_cache)}
    code, stderr = build(config, tmp_path / "warm.tar")
    assert code == 0, stderr
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    assert {path: path.read_bytes() for path in entries(private_cache)} == before


@pytest.mark.usefixtures("small_interval")
def test_a_wrong_checkpoint_fails_drops_the_entry_and_leaves_no_output(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    assert build(config, tmp_path / "1.tar")[0] == 0
    for path, document in checkpointed(private_cache).items():
        states = document["checkpoints"]["states"]
        document["checkpoints"]["states"] = "0" * 64 + states[64:]
        path.write_text(json.dumps(document))
    code, stderr = build(config, tmp_path / "2.tar")
    assert code == 1
    assert "no longer reach the cached layer's checkpoints" in stderr
    assert checkpointed(private_cache) == {}  # dropped
    assert not (tmp_path / "2.tar").exists()
    assert build(config, tmp_path / "2.tar")[0] == 0
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize("entry", ["without checkpoints", "another interval"])
def test_an_entry_without_usable_checkpoints_gets_them_on_a_rebuild(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path, entry: str
) -> None:
    _, config = image_config
    assert build(config, tmp_path / "1.tar")[0] == 0
    recorded = checkpointed(private_cache)
    for path, document in recorded.items():
        if entry == "without checkpoints":  # as an older version wrote it
            old = {key: value for key, value in document.items() if key != "checkpoints"}
        else:
            old = {**document, "checkpoints": {"interval": 8192, "states": "00" * 32}}
        path.write_text(json.dumps(old))
    code, stderr = build(config, tmp_path / "2.tar")
    assert code == 0, stderr
    assert "warning" not in stderr
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    assert checkpointed(private_cache) == recorded


@pytest.mark.parametrize(
    "checkpoints",
    [
        "no",
        {"interval": sha256.CHECKPOINT_INTERVAL, "states": "zz"},
        {"interval": sha256.CHECKPOINT_INTERVAL, "states": "00" * 33},
        {"interval": sha256.CHECKPOINT_INTERVAL, "states": 7},
    ],
)
def test_entries_with_malformed_checkpoints_are_ignored(
    tmp_path: Path, checkpoints: object
) -> None:
    warnings: list[str] = []
    cache = LayerCache(tmp_path, warnings.append)
    key = cache_key({"x": 1})
    (tmp_path / "layers").mkdir()
    size = 3 * sha256.CHECKPOINT_INTERVAL  # two checkpoints: 64 bytes, 128 hex digits
    document = {"version": 1, "key": key, "size": size, "diff_id": "sha256:" + "0" * 64}
    (tmp_path / "layers" / f"{key}.json").write_text(
        json.dumps(
            {
                **document,
                "checkpoints": {"interval": sha256.CHECKPOINT_INTERVAL, "states": "ab" * 64},
            }
        )
    )
    assert cache.get(key) == CachedLayer(size, document["diff_id"], bytes.fromhex("ab" * 64))
    (tmp_path / "layers" / f"{key}.json").write_text(
        json.dumps({**document, "checkpoints": checkpoints})
    )
    assert cache.get(key) is None
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "diff_id",
    ["sha256:" + "0" * 64 + "\n", "sha256:" + "A" * 64, "0" * 64, "sha256:" + "0" * 63, 7],
)
def test_entries_with_a_malformed_digest_are_ignored(tmp_path: Path, diff_id: object) -> None:
    warnings: list[str] = []
    cache = LayerCache(tmp_path, warnings.append)
    key = cache_key({"x": 1})
    (tmp_path / "layers").mkdir()
    document = {"version": 1, "key": key, "size": 10, "diff_id": "sha256:" + "0" * 64}
    (tmp_path / "layers" / f"{key}.json").write_text(json.dumps(document))
    assert cache.get(key) == CachedLayer(10, "sha256:" + "0" * 64)
    (tmp_path / "layers" / f"{key}.json").write_text(json.dumps({**document, "diff_id": diff_id}))
    assert cache.get(key) is None
    assert len(warnings) == 1
