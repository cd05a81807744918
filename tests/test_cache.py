"""The layer cache: same bytes cold, warm and without it; never trusted blindly.

Its entries (a layer's size, digest and checkpoints) and its member lists
(a layer's members, replayed instead of a walk of the store).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from guix_image.build import member_list
from guix_image.build.cache import CachedLayer, LayerCache, cache_key
from guix_image.build.config import validate_config
from guix_image.build.engine import BuildResult, build_image
from guix_image.build.member_list import (
    Member,
    MemberList,
    MemberListError,
    MemberListGone,
    MemberListWriter,
    OtherWriter,
)
from guix_image.build.output import atomic_output
from guix_image.build.store_layer import StaleCacheEntry, list_tag
from guix_image.cli import main
from guix_image.fastpath import sha256
from guix_image.store.walk import Store

from .support.stores import StoreTree, settle, write_config
from .support.tools import GUIX_IMAGE

if TYPE_CHECKING:
    from click.testing import CliRunner


def entries(cache: Path) -> list[Path]:
    layers = cache / "layers"
    return sorted(layers.glob("*.json")) if layers.exists() else []


def member_lists(cache: Path) -> list[Path]:
    layers = cache / "layers"
    return sorted(layers.glob("*.members")) if layers.exists() else []


def cli_build(runner: CliRunner, config: Path, output: Path, *extra: str) -> tuple[int, str]:
    """`guix-image build CONFIG -o OUTPUT`, in-process: its exit code and stderr."""
    result = runner.invoke(main, ["build", str(config), "-o", str(output), *extra])
    return result.exit_code, result.stderr


def cli_build_verbose(
    runner: CliRunner, config: Path, output: Path, *extra: str
) -> tuple[int, str]:
    """`guix-image build -v`: stderr says which layers came from the cached member list."""
    result = runner.invoke(main, ["build", "-v", str(config), "-o", str(output), *extra])
    return result.exit_code, result.stderr


def core_build(
    document: dict[str, Any],
    output: Path,
    directory: Path,
    warnings: list[str],
    *,
    checkpoint_interval: int = sha256.CHECKPOINT_INTERVAL,
    racy_margin: int = member_list.RACY_NS,
    **options: Any,
) -> BuildResult:
    """Build `document` to `output` through the core with the cache in `directory`, as the
    CLI does (a new LayerCache per build); `warnings` gets what the CLI would print as one."""
    cache = LayerCache(
        directory,
        warnings.append,
        checkpoint_interval=checkpoint_interval,
        racy_margin=racy_margin,
    )
    config = validate_config(document)
    warnings.extend(config.warnings)
    with atomic_output(str(output)) as fd:
        return build_image(config, fd, cache=cache, **options)


def no_temporary_output(output: Path) -> bool:
    return [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")] == []


def fails_once(runner: CliRunner, config: Path, output: Path, fresh: Path) -> None:
    """The store changed under a cached layer. Streamed, the build fails (what was
    written cannot be taken back), names --no-cache and drops the entry; into a file,
    the build starts again without the entry and writes what a fresh build writes."""
    streamed = runner.invoke(main, ["build", str(config)])
    assert streamed.exit_code == 1
    assert "the store paths changed since the layer cache recorded this layer" in (streamed.stderr)
    assert "the cache entry is dropped: run the build again, or build with --no-cache" in (
        streamed.stderr
    )
    code, stderr = cli_build(runner, config, output)  # the entry is gone: a cold build
    assert code == 0, stderr
    assert cli_build(runner, config, fresh, "--no-cache")[0] == 0
    assert output.read_bytes() == fresh.read_bytes()


def heals_at_once(runner: CliRunner, config: Path, output: Path, fresh: Path) -> None:
    """Into a file: the stale entry is dropped and the build goes on, saying so with -v;
    the archive is a fresh build's twin, and no temporary file is left."""
    result = runner.invoke(main, ["build", "-v", str(config), "-o", str(output)])
    assert result.exit_code == 0, result.stderr
    assert "building again without it" in result.stderr
    assert no_temporary_output(output)
    assert cli_build(runner, config, fresh, "--no-cache")[0] == 0
    assert output.read_bytes() == fresh.read_bytes()


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


@pytest.fixture
def image_config(store: StoreTree, tmp_path: Path) -> tuple[StoreTree, Path]:
    a = store.item("a", {"bin/a": "#!/bin/sh\n", "share/doc/a.txt": "A" * 5000})
    b = store.item("b", {"lib/b.so": os.urandom(300_000).hex()})
    c = store.item("c", {"bin/c": "#!/bin/sh\n", "share/doc/c.txt": "C" * 3000})
    d = store.item("d", {"lib/d.so": os.urandom(100_000).hex()})
    settle()  # old enough for member lists
    return store, write_config(tmp_path / "c.json", store.config([[a], [b], [c, d]]))


# -- entries ---------------------------------------------------------------------


def test_cold_warm_and_no_cache_give_the_same_bytes(
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    outputs = {name: tmp_path / f"{name}.tar" for name in ("cold", "warm", "none")}
    assert cli_build(cli_runner, config, outputs["cold"])[0] == 0
    assert len(entries(private_cache)) == 3
    code, stderr = cli_build(cli_runner, config, outputs["warm"], "-v")
    assert code == 0
    assert stderr.count("(cached digest confirmed, files from the cached member list)") == 3
    assert cli_build(cli_runner, config, outputs["none"], "--no-cache")[0] == 0
    data = {name: path.read_bytes() for name, path in outputs.items()}
    assert data["cold"] == data["warm"] == data["none"]


def test_no_cache_neither_reads_nor_writes(
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    assert cli_build(cli_runner, config, tmp_path / "o.tar", "--no-cache")[0] == 0
    assert entries(private_cache) == []


def test_entries_are_keyed_by_everything_that_changes_the_bytes(
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    document = json.loads(config.read_text())
    assert cli_build(cli_runner, config, tmp_path / "1.tar")[0] == 0
    first = set(entries(private_cache))
    for change in ({"mtime": "2001-01-01T00:00:00Z"}, {"uid": 1000}, {"gname": "users"}):
        changed = write_config(tmp_path / "changed.json", {**document, **change})
        assert cli_build(cli_runner, changed, tmp_path / "2.tar")[0] == 0
    assert len(set(entries(private_cache)) - first) == 9


def test_an_unreadable_entry_is_ignored_with_a_warning(
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    assert cli_build(cli_runner, config, tmp_path / "1.tar")[0] == 0
    for entry in entries(private_cache):
        entry.write_text("{not json")
    code, stderr = cli_build(cli_runner, config, tmp_path / "2.tar")
    assert code == 0
    assert stderr.count("warning: ignoring unreadable cache entry") == 3
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    for entry in entries(private_cache):
        assert json.loads(entry.read_text())["version"] == 1  # rewritten


@pytest.mark.parametrize("change", ["same size", "bigger", "smaller"])
def test_a_wrong_prediction_drops_the_entry_and_a_file_is_built_again(
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    change: str,
    cli_runner: CliRunner,
) -> None:
    store, config = image_config
    assert cli_build(cli_runner, config, tmp_path / "1.tar")[0] == 0
    # Edit a file deep inside a store item: the item's own inode and times
    # stay the same, so the cache key does too. Only hashing can tell.
    doc = store.path("a") / "share" / "doc" / "a.txt"
    doc.write_text({"same size": "B" * 5000, "bigger": "B" * 9000, "smaller": "B"}[change])
    heals_at_once(cli_runner, config, tmp_path / "2.tar", tmp_path / "3.tar")


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
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    code, stderr = cli_build(cli_runner, config, tmp_path / "o.tar")
    assert code == 0
    assert stderr.count("warning: cannot write the layer cache") == 1


def test_the_store_database_identifies_store_paths(
    store: StoreTree, tmp_path: Path, private_cache: Path, cli_runner: CliRunner
) -> None:
    item = store.item("db-item", {"f": "x"})
    database = store.base / "var" / "guix" / "db" / "db.sqlite"
    make_database(database, {str(item): "sha256:" + "1" * 64})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    assert cli_build(cli_runner, config, tmp_path / "1.tar")[0] == 0
    [entry] = entries(private_cache)
    os.utime(item, (1, 1))  # new times on the store path: the NAR hash still says "same"
    assert cli_build(cli_runner, config, tmp_path / "2.tar")[0] == 0
    assert entries(private_cache) == [entry]
    with sqlite3.connect(database) as db:
        db.execute("UPDATE ValidPaths SET hash = ?", ("sha256:" + "2" * 64,))
    db.close()
    assert cli_build(cli_runner, config, tmp_path / "3.tar")[0] == 0
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

SMALL_INTERVAL = 4096


def checkpointed(cache: Path) -> dict[Path, dict[str, Any]]:
    """The entries that have checkpoints, and their documents."""
    documents = {path: json.loads(path.read_text()) for path in entries(cache)}
    return {path: doc for path, doc in documents.items() if "checkpoints" in doc}


def test_a_first_build_records_checkpoints_and_a_rebuild_uses_them(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    document = json.loads(config.read_text())
    warnings: list[str] = []
    core_build(
        document,
        tmp_path / "cold.tar",
        private_cache,
        warnings,
        checkpoint_interval=SMALL_INTERVAL,
    )
    recorded = checkpointed(private_cache)
    assert len(recorded) == 3  # every layer is longer than one interval
    for entry in recorded.values():
        states = entry["checkpoints"]["states"]
        assert entry["checkpoints"]["interval"] == 4096
        assert len(states) == 64 * sha256.checkpoint_count(entry["size"], SMALL_INTERVAL)
    before = {path: path.read_bytes() for path in entries(private_cache)}
    core_build(  # raises if the rebuild fails
        document,
        tmp_path / "warm.tar",
        private_cache,
        warnings,
        checkpoint_interval=SMALL_INTERVAL,
    )
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    assert {path: path.read_bytes() for path in entries(private_cache)} == before


def test_a_wrong_checkpoint_fails_drops_the_entry_and_leaves_no_output(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path
) -> None:
    _, config = image_config
    document = json.loads(config.read_text())
    warnings: list[str] = []
    core_build(
        document, tmp_path / "1.tar", private_cache, warnings, checkpoint_interval=SMALL_INTERVAL
    )
    for path, entry in checkpointed(private_cache).items():
        states = entry["checkpoints"]["states"]
        entry["checkpoints"]["states"] = "0" * 64 + states[64:]
        path.write_text(json.dumps(entry))
    with pytest.raises(
        StaleCacheEntry, match="no longer reach the cached layer's checkpoints"
    ) as failure:
        core_build(
            document,
            tmp_path / "2.tar",
            private_cache,
            warnings,
            checkpoint_interval=SMALL_INTERVAL,
        )
    assert failure.value.exit_code == 1
    assert checkpointed(private_cache) == {}  # dropped
    assert not (tmp_path / "2.tar").exists()
    assert no_temporary_output(tmp_path / "2.tar")
    core_build(
        document, tmp_path / "2.tar", private_cache, warnings, checkpoint_interval=SMALL_INTERVAL
    )
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()


@pytest.mark.parametrize("entry", ["without checkpoints", "another interval"])
def test_an_entry_without_usable_checkpoints_gets_them_on_a_rebuild(
    image_config: tuple[StoreTree, Path], tmp_path: Path, private_cache: Path, entry: str
) -> None:
    _, config = image_config
    document = json.loads(config.read_text())
    warnings: list[str] = []
    core_build(
        document, tmp_path / "1.tar", private_cache, warnings, checkpoint_interval=SMALL_INTERVAL
    )
    recorded = checkpointed(private_cache)
    for path, recorded_entry in recorded.items():
        if entry == "without checkpoints":  # as an older version wrote it
            old = {key: value for key, value in recorded_entry.items() if key != "checkpoints"}
        else:
            old = {**recorded_entry, "checkpoints": {"interval": 8192, "states": "00" * 32}}
        path.write_text(json.dumps(old))
    warnings.clear()
    core_build(  # raises if the rebuild fails
        document, tmp_path / "2.tar", private_cache, warnings, checkpoint_interval=SMALL_INTERVAL
    )
    assert warnings == []
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


# -- member lists: the cache's record of a layer's members, replayed instead of a walk --

TAG = b"test-tag 1"


def fail(error: OSError) -> None:
    pytest.fail(f"a member list could not be written: {error}")


def record(path: Path, members: list[Member], *, chunk_members: int | None = None) -> None:
    options = {} if chunk_members is None else {"chunk_members": chunk_members}
    writer = MemberListWriter(path.parent, TAG, on_error=fail, **options)
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


def test_a_list_reads_back_what_was_written_across_chunks(tmp_path: Path) -> None:
    record(tmp_path / "m", MEMBERS, chunk_members=3)
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


# -- member lists in builds ---------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["no database", "database"])
def listed_image(
    request: pytest.FixtureRequest, store: StoreTree, tmp_path: Path
) -> tuple[StoreTree, Path]:
    a = store.item("a", {"bin/a": "#!/bin/sh\n", "share/doc/a.txt": "A" * 5000, "empty": ""})
    (a / "bin" / "link").symlink_to("a")
    b = store.item("b", {"lib/b.so": os.urandom(300_000), "lib/sub/c": "c"})
    if request.param:
        database = store.base / "var" / "guix" / "db" / "db.sqlite"
        make_database(database, {str(a): "sha256:" + "a" * 64, str(b): "sha256:" + "b" * 64})
    settle()
    # Layer 3 ships a and b again, on purpose: a layer that shares its paths.
    return store, write_config(tmp_path / "c.json", store.config([[a], [b], [a, b]]))


def no_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    def walk(*_: object) -> None:
        raise AssertionError("the store was walked")

    monkeypatch.setattr(Store, "_walk", walk)


def test_a_rebuild_streams_from_the_member_lists_without_walking(
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, config = listed_image
    document = json.loads(config.read_text())
    warnings: list[str] = []
    # max_planned=4: the third layer is walked twice
    core_build(document, tmp_path / "cold.tar", private_cache, warnings, max_planned=4)
    assert len(member_lists(private_cache)) == 3
    no_walks(monkeypatch)
    result = core_build(  # raises if the rebuild fails
        document, tmp_path / "warm.tar", private_cache, warnings, max_planned=4
    )
    assert sum(layer.cached and layer.listed for layer in result.layers) == 3
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()


def test_a_store_just_written_is_walked_again_next_time(
    store: StoreTree, tmp_path: Path, private_cache: Path, cli_runner: CliRunner
) -> None:
    item = store.item("fresh", {"f": "x"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    # "At once" on a machine of any speed: written less than 600 s before the walk.
    warnings: list[str] = []
    core_build(
        store.config([[item]]), tmp_path / "1.tar", private_cache, warnings, racy_margin=600 * 10**9
    )
    assert warnings == []
    assert member_lists(private_cache) == []  # too recent
    settle()
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "2.tar")
    assert code == 0 and "files from the cached member list" not in stderr
    assert len(member_lists(private_cache)) == 1
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "3.tar")
    assert code == 0 and "files from the cached member list" in stderr


@pytest.mark.parametrize("change", ["directory", "relinked file"])
def test_a_change_that_keeps_the_bytes_means_one_walk(
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    change: str,
    cli_runner: CliRunner,
) -> None:
    store, config = listed_image
    assert cli_build_verbose(cli_runner, config, tmp_path / "cold.tar")[0] == 0
    before = {p: p.read_bytes() for p in member_lists(private_cache)}
    if change == "directory":
        os.chmod(store.path("b") / "lib" / "sub", 0o755)  # the same mode, a new ctime
    else:  # what deduplicating a store does: the same file, a new inode
        library = store.path("b") / "lib" / "b.so"
        shutil.copy2(library, library.with_suffix(".new"))
        os.replace(library.with_suffix(".new"), library)
    settle()
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "warm.tar")
    assert code == 0, stderr
    assert stderr.count("files from the cached member list") == 1  # layer 1: a, unchanged
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    after = {p: p.read_bytes() for p in member_lists(private_cache)}
    assert after.keys() == before.keys()
    assert sum(after[p] != before[p] for p in after) == 2  # recorded again
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "again.tar")
    assert code == 0
    assert stderr.count("files from the cached member list") == 3


@pytest.mark.parametrize(
    "change",
    ["mode", "new file", "removed file", "same size", "symlink target", "empty file written"],
)
def test_a_store_edited_under_a_member_list_fails_once(
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    change: str,
    cli_runner: CliRunner,
) -> None:
    store, config = listed_image
    assert cli_build_verbose(cli_runner, config, tmp_path / "cold.tar")[0] == 0
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
    fails_once(cli_runner, config, tmp_path / "warm.tar", tmp_path / "fresh.tar")


def test_an_unreadable_member_list_is_ignored_with_a_warning(
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = listed_image
    assert cli_build_verbose(cli_runner, config, tmp_path / "cold.tar")[0] == 0
    for path in member_lists(private_cache):
        path.write_bytes(path.read_bytes()[:-1])
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "warm.tar")
    assert code == 0
    assert stderr.count("warning: ignoring unreadable member list") == 3
    assert (tmp_path / "cold.tar").read_bytes() == (tmp_path / "warm.tar").read_bytes()
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "again.tar")  # recorded again
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert code == 0 and all("shipped 2 times" in line for line in warnings)  # the config's
    assert stderr.count("files from the cached member list") == 3


def test_a_cache_that_fills_up_only_warns(
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli_runner: CliRunner,
) -> None:
    _, config = listed_image
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
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "o.tar")
    assert code == 0
    assert stderr.count("warning: cannot write the layer cache") == 1
    assert "No space left on device" in stderr
    assert member_lists(private_cache) == []
    assert not [p for p in (private_cache / "layers").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(os, "fdopen", opened)
    assert cli_build_verbose(cli_runner, config, tmp_path / "p.tar", "--no-cache")[0] == 0
    assert (tmp_path / "o.tar").read_bytes() == (tmp_path / "p.tar").read_bytes()


def test_an_entry_that_cannot_be_written_takes_its_member_list_with_it(
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli_runner: CliRunner,
) -> None:
    """The disk fills up between a layer's member list and its entry: the list,
    which is only ever used with its entry, does not stay behind."""
    _, config = listed_image
    opened = os.fdopen

    def full_for_entries(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = opened(fd, mode, *args, **kwargs)
        if "/.entry-" in os.readlink(f"/proc/self/fd/{fd}"):
            file.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return file

    monkeypatch.setattr(os, "fdopen", full_for_entries)
    code, stderr = cli_build_verbose(cli_runner, config, tmp_path / "o.tar")
    assert code == 0
    assert "warning: cannot write the layer cache" in stderr
    layers = private_cache / "layers"
    assert not list(layers.glob("*.json"))
    assert member_lists(private_cache) == []
    assert not [p for p in layers.iterdir() if p.name.startswith(".")]


def test_a_reader_that_goes_away_keeps_the_cache(
    store: StoreTree, tmp_path: Path, private_cache: Path, cli_runner: CliRunner
) -> None:
    """A closed pipe ends a build with 141, as always: it says nothing about the store."""
    # 25 MB in small files: many blocks, all in the member-list path
    files: dict[str, str | bytes] = {f"share/f{i:03d}": os.urandom(100_000) for i in range(250)}
    item = store.item("many", files)
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    settle()
    assert cli_build_verbose(cli_runner, config, tmp_path / "cold.tar")[0] == 0
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
    listed_image: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    store, config = listed_image
    os.mkfifo(store.path("b") / "lib" / "fifo")
    code, _ = cli_build_verbose(cli_runner, config, tmp_path / "o.tar")
    assert code == 2
    layers_directory = private_cache / "layers"
    assert not layers_directory.exists() or not list(layers_directory.iterdir())


def write_lists(directory: Path, keys: list[str]) -> dict[str, int]:
    """A list per key, each older than the next, beside its entry; their sizes."""
    sizes = {}
    for age, key in enumerate(keys):
        cache = LayerCache(directory, pytest.fail)
        writer = cache.start_member_list(key, list_tag())
        assert writer is not None
        writer.add((b"\0" * 512 * 100, 0, b"name", 0o755, 1, 1))
        writer.finish(read_since=time.time_ns())
        cache.commit_member_lists()
        path = directory / "layers" / f"{key}.members"
        os.utime(path, (1000 + age, 1000 + age))
        (directory / "layers" / f"{key}.json").write_bytes(b"{}")
        sizes[key] = path.stat().st_size
    return sizes


def remaining(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "layers").glob("*.members"))


def test_the_least_recently_used_lists_go_first(tmp_path: Path) -> None:
    sizes = write_lists(tmp_path, ["old", "middle", "new"])
    cache = LayerCache(tmp_path, pytest.fail)
    assert cache.member_list("old", list_tag()) is not None  # used: now the most recent
    LayerCache(tmp_path, pytest.fail)._trim(budget=sizes["old"] + sizes["new"])
    assert remaining(tmp_path) == ["new.members", "old.members"]


def test_a_build_never_trims_the_lists_it_uses(tmp_path: Path) -> None:
    write_lists(tmp_path, ["a", "b"])
    cache = LayerCache(tmp_path, pytest.fail)
    assert cache.member_list("a", list_tag()) is not None
    assert cache.member_list("b", list_tag()) is not None
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
    # Member lists: one whose entry a crash kept from being written, one with its
    # entry, and one whose entry perhaps a build running now is about to write.
    orphan, kept, young = (tmp_path / "layers" / f"{key}.members" for key in "abc")
    for path in (orphan, kept, young):
        path.write_bytes(b"x")
    (tmp_path / "layers" / "b.json").write_bytes(b"{}")
    os.utime(orphan, (1, 1))
    os.utime(kept, (1, 1))
    cache._trim()
    assert not stale.exists()
    assert fresh.exists()  # perhaps a build running now
    assert not orphan.exists()
    assert kept.exists() and young.exists()


# -- entries and lists that are not what they seem -------------------------------------


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "garbage"])
def test_an_entry_that_is_not_a_readable_entry_is_ignored_and_dropped(
    target: str,
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    assert cli_build(cli_runner, config, tmp_path / "1.tar")[0] == 0
    entry = entries(private_cache)[0]
    entry.unlink()
    if target == "fifo":
        os.mkfifo(entry)
    elif target == "garbage":
        entry.write_bytes(b"[" * 5000)
    else:
        entry.symlink_to(target)
    started = time.monotonic()
    code, stderr = cli_build(cli_runner, config, tmp_path / "2.tar")
    assert code == 0, stderr
    assert time.monotonic() - started < 30
    assert "dropping it" in stderr
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    assert entry.is_file() and not entry.is_symlink()  # dropped, then written again


def test_a_member_list_that_is_a_fifo_is_not_waited_on(
    image_config: tuple[StoreTree, Path],
    tmp_path: Path,
    private_cache: Path,
    cli_runner: CliRunner,
) -> None:
    _, config = image_config
    assert cli_build(cli_runner, config, tmp_path / "1.tar")[0] == 0
    for path in member_lists(private_cache):
        path.unlink()
        os.mkfifo(path)
    code, stderr = cli_build(cli_runner, config, tmp_path / "2.tar")
    assert code == 0, stderr
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
