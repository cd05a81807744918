"""Member lists: the cache's record of a layer's members, replayed instead of a walk."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from guix_image import layers, member_list
from guix_image.cache import LayerCache
from guix_image.cli import main
from guix_image.member_list import (
    Member,
    MemberList,
    MemberListError,
    MemberListGone,
    MemberListWriter,
    OtherWriter,
)
from guix_image.store import Store

from .conftest import StoreTree, settle, write_config
from .test_cache import GUIX_IMAGE, entries, fails_once, make_database, member_lists

TAG = b"test-tag 1"


def fail(error: OSError) -> None:
    pytest.fail(f"a member list could not be written: {error}")


def record(path: Path, members: list[Member]) -> None:
    writer = MemberListWriter(path.parent, TAG, on_error=fail)
    for member in members:
        writer.add(member)
    writer.finish(read_since=time.time_ns())
    writer.commit(path)


def replay(path: Path, *, headers: bool = True) -> list[Member]:
    found = []
    members = MemberList(str(path), TAG)
    for chunk in members.chunks(headers=headers):
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
    assert MemberList(str(tmp_path / "m"), TAG).count == 10
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary file left


def test_an_empty_list_is_a_list(tmp_path: Path) -> None:
    record(tmp_path / "m", [])
    assert replay(tmp_path / "m") == []


def test_a_list_from_other_code_is_not_used(tmp_path: Path) -> None:
    record(tmp_path / "m", MEMBERS)
    with pytest.raises(OtherWriter, match="written by test-tag 1, not test-tag 2"):
        MemberList(str(tmp_path / "m"), b"test-tag 2")


def test_a_list_holding_a_ctime_from_the_last_moments_is_not_kept(tmp_path: Path) -> None:
    """A change in the clock tick of the scan may not change the ctime read."""
    now = time.time_ns()
    for ctime, kept in ((now - 10**9, True), (now - 10**6, False), (now // 10**9 * 10**9, False)):
        writer = MemberListWriter(tmp_path, TAG, on_error=fail)
        writer.add((b"\0" * 512, 0, b"d/", 0o755, 1, ctime))
        writer.finish(read_since=now)
        writer.commit(tmp_path / "m")
        assert (tmp_path / "m").exists() == kept, ctime
        (tmp_path / "m").unlink(missing_ok=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage",
    ["truncated", "extended", "not a list", "count", "chunk too long", "names", "ends", "order"],
)
def test_a_damaged_list_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "m"
    record(path, MEMBERS[:4])
    data = bytearray(path.read_bytes())
    chunk = len(member_list.MAGIC) + 16 + 64  # magic, member count, file length, tag
    arrays = chunk + 12 + 4 * 32  # the chunk header, then 32 bytes of arrays per member
    if damage == "truncated":
        del data[-20:]
    elif damage == "extended":
        data += b"\0"
    elif damage == "not a list":
        data[:5] = b"hello"
    elif damage == "count":  # a member more than the header says
        data[len(member_list.MAGIC)] += 1
    elif damage == "chunk too long":
        data[chunk : chunk + 4] = (1 << 30).to_bytes(4, "little")
    elif damage == "names":  # one more NUL: five names for four members
        data[arrays + 2] = 0
    elif damage == "ends":  # the last header ends before the headers do
        data[arrays - 4] ^= 0xFF
    elif damage == "order":  # the first two members' headers swapped ends
        ends = arrays - 16
        data[ends : ends + 8] = data[ends + 4 : ends + 8] + data[ends : ends + 4]
    path.write_bytes(bytes(data))
    with pytest.raises(MemberListError):
        replay(path)


# -- in builds ---------------------------------------------------------------


def build(config: Path, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["build", "-v", str(config), "-o", str(output), *extra])
    return result.exit_code, result.stderr


@pytest.fixture(params=[False, True], ids=["no database", "database"])
def image(
    request: pytest.FixtureRequest, store: StoreTree, tmp_path: Path
) -> tuple[StoreTree, Path]:
    a = store.item("a", {"bin/a": "#!/bin/sh\n", "share/doc/a.txt": "A" * 5000, "empty": ""})
    (a / "bin" / "link").symlink_to("a")
    b = store.item("b", {"lib/b.so": os.urandom(300_000), "lib/sub/c": "c"})
    if request.param:
        database = store.base / "var" / "guix" / "db" / "db.sqlite"
        make_database(database, {str(a): "sha256:" + "a" * 64, str(b): "sha256:" + "b" * 64})
    settle()
    return store, write_config(tmp_path / "c.json", store.config([[a], [b], [a, b]]))


def no_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    def walk(*_: object) -> None:
        raise AssertionError("the store was walked")

    monkeypatch.setattr(Store, "_walk", walk)


def test_a_rebuild_streams_from_the_member_lists_without_walking(
    image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, config = image
    monkeypatch.setattr(layers, "MAX_PLANNED", 4)  # the third layer is walked twice
    assert build(config, tmp_path / "cold.tar")[0] == 0
    assert len(member_lists(private_cache)) == 3
    no_walks(monkeypatch)
    code, stderr = build(config, tmp_path / "warm.tar")
    assert code == 0, stderr
    assert stderr.count("(cached digest confirmed, files from the cached member list)") == 3
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()


def test_a_store_just_written_is_walked_again_next_time(
    store: StoreTree, tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = store.item("fresh", {"f": "x"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    with monkeypatch.context() as patch:  # "at once" on a machine of any speed
        patch.setattr(member_list, "RACY_NS", 600 * 10**9)
        assert build(config, tmp_path / "1.tar")[0] == 0  # too recent to list
    assert member_lists(private_cache) == []
    settle()
    code, stderr = build(config, tmp_path / "2.tar")
    assert code == 0 and "files from the cached member list" not in stderr
    assert len(member_lists(private_cache)) == 1
    code, stderr = build(config, tmp_path / "3.tar")
    assert code == 0 and "files from the cached member list" in stderr


@pytest.mark.parametrize("change", ["directory", "relinked file"])
def test_a_change_that_keeps_the_bytes_means_one_walk(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path, change: str
) -> None:
    store, config = image
    assert build(config, tmp_path / "cold.tar")[0] == 0
    before = {p: p.read_bytes() for p in member_lists(private_cache)}
    if change == "directory":
        os.chmod(store.path("b") / "lib" / "sub", 0o755)  # the same mode, a new ctime
    else:  # what deduplicating a store does: the same file, a new inode
        library = store.path("b") / "lib" / "b.so"
        shutil.copy2(library, library.with_suffix(".new"))
        os.replace(library.with_suffix(".new"), library)
    settle()
    code, stderr = build(config, tmp_path / "warm.tar")
    assert code == 0, stderr
    assert stderr.count("files from the cached member list") == 1  # layer 1: a, unchanged
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    after = {p: p.read_bytes() for p in member_lists(private_cache)}
    assert after.keys() == before.keys()
    assert sum(after[p] != before[p] for p in after) == 2  # recorded again
    code, stderr = build(config, tmp_path / "again.tar")
    assert code == 0
    assert stderr.count("files from the cached member list") == 3


@pytest.mark.parametrize(
    "change",
    ["mode", "new file", "removed file", "same size", "symlink target", "empty file written"],
)
def test_a_store_edited_under_a_member_list_fails_once(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path, change: str
) -> None:
    store, config = image
    assert build(config, tmp_path / "cold.tar")[0] == 0
    a = store.path("a")
    doc = a / "share" / "doc" / "a.txt"
    if change == "mode":
        doc.chmod(0o600)  # checked as the file is opened
    elif change == "new file":
        (doc.parent / "new.txt").write_text("new")  # its directory's ctime changes
    elif change == "removed file":
        doc.unlink()
    elif change == "same size":
        doc.write_text("B" * 5000)  # only the digest can tell
    elif change == "symlink target":
        (a / "bin" / "link").unlink()
        (a / "bin" / "link").symlink_to("elsewhere")
    else:
        (a / "empty").write_text("no longer empty")
    settle()
    fails_once(config, tmp_path / "warm.tar", tmp_path / "fresh.tar")


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
    assert code == 0 and "warning" not in stderr
    assert stderr.count("files from the cached member list") == 3


def test_a_cache_that_fills_up_only_warns(
    image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, config = image
    opened = os.fdopen

    class FullDisk:
        """A file opened for writing on a disk with no room left."""

        def __init__(self, fd: int, mode: str) -> None:
            self._file = opened(fd, mode)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> object:
            return getattr(self._file, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *_: object) -> None:
            self._file.close()

    monkeypatch.setattr(os, "fdopen", FullDisk)  # the cache's files, not the output
    code, stderr = build(config, tmp_path / "o.tar")
    assert code == 0
    assert stderr.count("warning: cannot write the layer cache") == 1
    assert "No space left on device" in stderr
    assert member_lists(private_cache) == []
    assert not [p for p in (private_cache / "layers").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(os, "fdopen", opened)
    assert build(config, tmp_path / "p.tar", "--no-cache")[0] == 0
    assert (tmp_path / "o.tar").read_bytes() == (tmp_path / "p.tar").read_bytes()


def test_a_reader_that_goes_away_keeps_the_cache(
    store: StoreTree, tmp_path: Path, private_cache: Path
) -> None:
    """A closed pipe ends a build with 141, as always: it says nothing about the store."""
    # 25 MB in small files: many blocks, all in the member-list path
    files: dict[str, str | bytes] = {f"share/f{i:03d}": os.urandom(100_000) for i in range(250)}
    item = store.item("many", files)
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    settle()
    assert build(config, tmp_path / "cold.tar")[0] == 0
    assert len(member_lists(private_cache)) == 1
    env = {**os.environ, "XDG_CACHE_HOME": str(private_cache.parent)}
    process = subprocess.Popen(
        [*GUIX_IMAGE, "build", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(100)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, stderr
    assert "changed" not in stderr
    assert len(member_lists(private_cache)) == 1
    assert len(entries(private_cache)) == 1


def test_a_failed_build_keeps_no_member_list(
    image: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    store, config = image
    os.mkfifo(store.path("b") / "lib" / "fifo")
    code, _ = build(config, tmp_path / "o.tar")
    assert code == 2
    layers_directory = private_cache / "layers"
    assert not layers_directory.exists() or not list(layers_directory.iterdir())


def write_lists(directory: Path, keys: list[str]) -> dict[str, int]:
    """A list per key, each older than the next; their sizes."""
    sizes = {}
    for age, key in enumerate(keys):
        cache = LayerCache(directory, pytest.fail)
        writer = cache.start_member_list(key)
        assert writer is not None
        writer.add((b"\0" * 512 * 100, 0, b"name", 0o755, 1, 1))
        writer.finish(read_since=time.time_ns())
        cache.commit_member_lists()
        path = directory / "layers" / f"{key}.members"
        os.utime(path, (1000 + age, 1000 + age))
        sizes[key] = path.stat().st_size
    return sizes


def remaining(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "layers").iterdir())


def test_the_least_recently_used_lists_go_first(tmp_path: Path) -> None:
    sizes = write_lists(tmp_path, ["old", "middle", "new"])
    cache = LayerCache(tmp_path, pytest.fail)
    assert cache.member_list("old") is not None  # used: now the most recent
    LayerCache(tmp_path, pytest.fail)._trim(budget=sizes["old"] + sizes["new"])
    assert remaining(tmp_path) == ["new.members", "old.members"]


def test_a_build_never_trims_the_lists_it_uses(tmp_path: Path) -> None:
    write_lists(tmp_path, ["a", "b"])
    cache = LayerCache(tmp_path, pytest.fail)
    assert cache.member_list("a") is not None and cache.member_list("b") is not None
    cache._trim(budget=0)  # one image's lists over the budget: kept, not thrashed
    assert remaining(tmp_path) == ["a.members", "b.members"]
    LayerCache(tmp_path, pytest.fail)._trim(budget=0)
    assert remaining(tmp_path) == []


def test_a_list_replaced_after_it_was_found_is_not_read(tmp_path: Path) -> None:
    record(tmp_path / "m", MEMBERS)
    found = MemberList(str(tmp_path / "m"), TAG)
    record(tmp_path / "m", MEMBERS[:2])  # another build's, meanwhile
    with pytest.raises(MemberListGone, match="replaced"):
        found.chunks()
    (tmp_path / "m").unlink()
    with pytest.raises(MemberListGone, match="removed"):
        found.chunks()


def test_a_build_of_many_layers_holds_few_files_open(
    store: StoreTree, tmp_path: Path, private_cache: Path
) -> None:
    items = [store.item(f"i{n}", {"bin/f": str(n), "share/g": "g"}) for n in range(80)]
    config = write_config(tmp_path / "c.json", store.config([[item] for item in items]))
    settle()
    env = {**os.environ, "XDG_CACHE_HOME": str(private_cache.parent)}

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    for run in ("cold", "warm"):
        done = subprocess.run(
            [*GUIX_IMAGE, "build", "-v", str(config), "-o", str(tmp_path / f"{run}.tar")],
            env=env,
            preexec_fn=limited,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    assert done.stderr.count("files from the cached member list") == 80
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()


def test_a_crashed_builds_temporary_files_are_cleaned_up(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path, pytest.fail)
    (tmp_path / "layers").mkdir()
    stale, fresh = tmp_path / "layers" / ".members-abc", tmp_path / "layers" / ".entry-def"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1, 1))
    cache._trim()
    assert not stale.exists()
    assert fresh.exists()  # perhaps a build running now
