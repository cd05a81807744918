"""Member lists: the cache's record of a layer's members, replayed instead of a walk."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from guix_image import layers, member_list
from guix_image.cache import LayerCache
from guix_image.cli import main
from guix_image.member_list import MemberList, MemberListError, MemberListWriter
from guix_image.store import Store

from .conftest import StoreTree, write_config
from .test_cache import make_database, member_lists


def record(path: Path, members: list[tuple[bytes, int, bytes, int, int, int]]) -> None:
    with path.open("wb") as file:
        writer = MemberListWriter(file)
        for member in members:
            writer.add(member)
        writer.finish()


def replay(path: Path, *, headers: bool = True) -> list[tuple[bytes, int, bytes, int, int, int]]:
    found = []
    for chunk in MemberList(str(path)).chunks(headers=headers):
        start = 0
        for i, name in enumerate(chunk.names):
            header = bytes(chunk.headers[start : chunk.ends[i]]) if headers else b""
            start = chunk.ends[i]
            found.append(
                (header, chunk.sizes[i], name, chunk.modes[i], chunk.inodes[i], chunk.ctimes[i])
            )
    return found


MEMBERS = [
    (bytes([i % 251]) * (512 * (1 + i % 3)), i * 1000, b"gnu/store/x/f%d" % i, 0o644, i, -i)
    for i in range(10)
]


def test_a_list_reads_back_what_was_written_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(member_list, "CHUNK_MEMBERS", 3)
    record(tmp_path / "m", MEMBERS)
    assert replay(tmp_path / "m") == MEMBERS
    skipped = replay(tmp_path / "m", headers=False)
    assert [m[1:] for m in skipped] == [m[1:] for m in MEMBERS]
    assert MemberList(str(tmp_path / "m")).count == 10


def test_an_empty_list_is_a_list(tmp_path: Path) -> None:
    record(tmp_path / "m", [])
    assert replay(tmp_path / "m") == []


@pytest.mark.parametrize(
    "damage",
    ["truncated", "extended", "not a list", "count", "chunk too long"],
)
def test_a_damaged_list_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "m"
    record(path, MEMBERS)
    data = bytearray(path.read_bytes())
    header = len(member_list.MAGIC) + 16  # magic, member count, file length
    if damage == "truncated":
        del data[-20:]
    elif damage == "extended":
        data += b"\0"
    elif damage == "not a list":
        data[:5] = b"hello"
    elif damage == "count":  # a member more than the header says
        data[len(member_list.MAGIC)] += 1
    elif damage == "chunk too long":
        data[header : header + 4] = (1 << 30).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(MemberListError):
        replay(path)


# -- in builds ---------------------------------------------------------------


def build(config: Path, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["build", "-v", str(config), "-o", str(output), *extra])
    return result.exit_code, result.stderr


@pytest.fixture
def image(store: StoreTree, tmp_path: Path) -> tuple[StoreTree, Path]:
    a = store.item("a", {"bin/a": "#!/bin/sh\n", "share/doc/a.txt": "A" * 5000, "empty": ""})
    (a / "bin" / "link").symlink_to("a")
    b = store.item("b", {"lib/b.so": os.urandom(300_000), "lib/sub/c": "c"})
    return store, write_config(tmp_path / "c.json", store.config([[a], [b], [a, b]]))


def no_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    def walk(*_: object) -> None:
        raise AssertionError("the store was walked")

    monkeypatch.setattr(Store, "_walk", walk)


@pytest.mark.parametrize("registered", [False, True], ids=["no database", "database"])
def test_a_rebuild_streams_from_the_member_lists_without_walking(
    image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    registered: bool,
) -> None:
    store, config = image
    if registered:
        database = store.base / "var" / "guix" / "db" / "db.sqlite"
        make_database(database, {str(store.path(n)): f"sha256:{n * 64}" for n in "ab"})
    monkeypatch.setattr(layers, "MAX_PLANNED", 4)  # the third layer is walked twice
    assert build(config, tmp_path / "cold.tar")[0] == 0
    assert len(member_lists(private_cache)) == 3
    no_walks(monkeypatch)
    code, stderr = build(config, tmp_path / "warm.tar")
    assert code == 0, stderr
    assert stderr.count("(cached digest confirmed, files from the cached member list)") == 3
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()


def test_a_directory_that_changed_is_walked_again(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    store, config = image
    assert build(config, tmp_path / "cold.tar")[0] == 0
    before = {p: p.read_bytes() for p in member_lists(private_cache)}
    time.sleep(0.01)  # a new ctime, even where the clock is coarse
    directory = store.path("b") / "lib" / "sub"
    os.chmod(directory, 0o755)  # the same mode: the layer's bytes do not change
    code, stderr = build(config, tmp_path / "warm.tar")
    assert code == 0, stderr
    assert stderr.count("files from the cached member list") == 1  # layer 1: only a
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    after = {p: p.read_bytes() for p in member_lists(private_cache)}
    assert after.keys() == before.keys()
    assert sum(after[p] != before[p] for p in after) == 2  # recorded again, new ctime
    code, stderr = build(config, tmp_path / "again.tar")
    assert stderr.count("files from the cached member list") == 3


@pytest.mark.parametrize("change", ["mode", "new file", "removed file", "same size"])
def test_a_store_edited_under_a_member_list_fails_once(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path, change: str
) -> None:
    store, config = image
    assert build(config, tmp_path / "cold.tar")[0] == 0
    time.sleep(0.01)
    doc = store.path("a") / "share" / "doc" / "a.txt"
    if change == "mode":
        doc.chmod(0o600)  # checked as the file is opened
    elif change == "new file":
        (doc.parent / "new.txt").write_text("new")  # its directory's ctime changes
    elif change == "removed file":
        doc.unlink()
    else:
        doc.write_text("B" * 5000)  # only the digest can tell
    output = tmp_path / "warm.tar"
    code, stderr = build(config, output)
    assert code == 1
    assert "the store paths changed since this layer was cached" in stderr
    assert not output.exists()
    assert build(config, output)[0] == 0
    assert build(config, tmp_path / "fresh.tar", "--no-cache")[0] == 0
    assert output.read_bytes() == (tmp_path / "fresh.tar").read_bytes()


def test_an_unreadable_member_list_is_ignored_with_a_warning(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image
    assert build(config, tmp_path / "cold.tar")[0] == 0
    for path in member_lists(private_cache):
        path.write_bytes(path.read_bytes()[:-1])
    code, stderr = build(config, tmp_path / "warm.tar")
    assert code == 0
    assert stderr.count("warning: ignoring unreadable member list") == 3
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    code, stderr = build(config, tmp_path / "again.tar")  # recorded again
    assert "warning" not in stderr
    assert stderr.count("files from the cached member list") == 3


def test_a_failed_build_keeps_no_member_list(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    store, config = image
    os.mkfifo(store.path("b") / "lib" / "fifo")
    code, _ = build(config, tmp_path / "o.tar")
    assert code == 2
    layers_directory = private_cache / "layers"
    assert not layers_directory.exists() or not list(layers_directory.iterdir())


def test_the_least_recently_used_lists_go_first(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path, print)
    sizes = {}
    for age, key in enumerate(["old", "middle", "new"]):
        writer = cache.start_member_list(key)
        assert writer is not None
        writer.add((b"\0" * 512 * 100, 0, b"name", 0o755, 1, 1))
        writer.finish()
        cache.commit_member_lists()
        path = tmp_path / "layers" / f"{key}.members"
        os.utime(path, (1000 + age, 1000 + age))
        sizes[key] = path.stat().st_size
    assert cache.member_list("old") is not None  # used: now the most recent
    cache._trim(budget=sizes["old"] + sizes["new"])
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == [
        "new.members",
        "old.members",
    ]


def test_a_crashed_builds_temporary_files_are_cleaned_up(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path, print)
    (tmp_path / "layers").mkdir()
    stale, fresh = tmp_path / "layers" / ".members-abc", tmp_path / "layers" / ".entry-def"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1, 1))
    cache._trim()
    assert not stale.exists()
    assert fresh.exists()  # perhaps a build running now


def test_the_database_vouches_for_relinked_files(
    store: StoreTree, tmp_path: Path, private_cache: Path
) -> None:
    """Deduplication relinks store files: new ctimes, same contents; still no walk."""
    item = store.item("d", {"sub/f": "x" * 3000})
    database = store.base / "var" / "guix" / "db" / "db.sqlite"
    make_database(database, {str(item): "sha256:" + "3" * 64})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    assert build(config, tmp_path / "1.tar")[0] == 0
    time.sleep(0.01)
    os.link(item / "sub" / "f", tmp_path / "dedup-link")  # the file's ctime changes
    code, stderr = build(config, tmp_path / "2.tar")
    assert code == 0
    assert "files from the cached member list" in stderr
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    with sqlite3.connect(database) as db:  # the database is only read
        assert db.execute("SELECT count(*) FROM ValidPaths").fetchone() == (1,)
    db.close()
