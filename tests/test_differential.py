"""Differential tests: our tar reader against Go's archive/tar and Python's tarfile.

Loaders (docker, containerd, podman, skopeo, umoci) read with Go's
archive/tar. The promise (see guix_image/tar/reader.py): for every archive,
we either read exactly what Go reads (and what tarfile reads), or refuse it.
Go's own reader is the oracle: tests/support/oracle/oracle.go, built here
with the system's Go (Debian's golang-go; `.ci/run` installs it). Each
archive of a hand-made corpus of the tricks where readers differ, and of a
few thousand seeded mutations of valid archives, is read by all three.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from guix_image.errors import ArchiveError
from guix_image.tar.format import DIRTYPE, REGTYPE
from guix_image.tar.reader import TarReader
from guix_image.tar.writer import HeaderEncoder

from .support.archives import (
    END,
    config_name,
    docker_archive,
    header,
    image_config,
    member,
    pax,
    pax_record,
    sha256,
    tar,
)
from .support.cli import Cli
from .support.tools import docker_answers

HEADER_ONLY = {"1", "2", "3", "4", "5", "6"}
# A reading: one (name, type, link target, content sha256) per entry, or why it failed.
Reading = list[tuple[str, str, str, str]] | str


def entry(name: str, kind: str, link: str, content: bytes) -> tuple[str, str, str, str]:
    return entry_of(name, kind, link, hashlib.sha256(content).hexdigest())


def entry_of(name: str, kind: str, link: str, digest: str) -> tuple[str, str, str, str]:
    # Readers disagree only on how they report these, not on what they read:
    # a directory's trailing slash, and type 7 (a regular file to all).
    kind = "0" if kind in ("\0", "7") else kind
    return (name.rstrip("/"), kind, link, digest)


def ours(data: bytes) -> Reading:
    entries = []
    try:
        reader = TarReader(io.BytesIO(data), name="archive")
        for member in reader:
            kind = member.type.decode("latin-1")
            entries.append(entry(member.name, kind, member.linkname, reader.read()))
    except ArchiveError as error:
        return f"refused: {error}"
    return entries


def python(data: bytes) -> Reading:
    entries = []
    try:
        with tarfile.open(
            fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as archive:
            for info in archive:
                kind = info.type.decode("latin-1")
                content = b""
                if kind not in HEADER_ONLY:
                    content = data[info.offset_data : info.offset_data + info.size]
                    if len(content) != info.size:
                        return "tarfile: truncated"
                entries.append(entry(info.name, kind, info.linkname, content))
    except (tarfile.TarError, ValueError, UnicodeError) as error:
        return f"tarfile: {error}"
    return entries


def go(oracle: Path, archives: list[bytes], directory: Path) -> list[Reading]:
    paths = []
    for number, data in enumerate(archives):
        path = directory / f"{number}.tar"
        path.write_bytes(data)
        paths.append(str(path))
    result = subprocess.run(
        [str(oracle), "tar", *paths], capture_output=True, text=True, check=True, timeout=600
    )
    readings: list[Reading] = []
    for line in result.stdout.splitlines():
        answer = json.loads(line)
        if "error" in answer:
            readings.append(f"go: {answer['error']}")
            continue
        # Go returns a PAX global header as an entry; docker ignores it, and so do we.
        readings.append(
            [
                entry_of(_text(e["name"]), kind, _text(e["linkname"]), e["sha256"])
                for e in answer["entries"]
                if (kind := bytes.fromhex(e["type"]).decode("latin-1")) != "g"
            ]
        )
    return readings


def _text(hex_bytes: str) -> str:
    """Bytes as the Python readers give them: UTF-8, undecodable bytes as surrogates."""
    return bytes.fromhex(hex_bytes).decode("utf-8", "surrogateescape")


def disagreement(data: bytes, go_reading: Reading) -> str | None:
    """Why our reading breaks the promise, or None if it keeps it."""
    mine = ours(data)
    if isinstance(mine, str):
        return None  # refusing is always allowed
    if mine != go_reading:
        return f"we read {mine}\nGo reads {go_reading}"
    theirs = python(data)
    if mine != theirs:
        return f"we read {mine}\ntarfile reads {theirs}"
    return None


# -- the corpus -------------------------------------------------------------------


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def edited(name: str, data: bytes = b"", **fields: bytes) -> bytes:
    """A member whose header fields (by offset, as 'at_124=b"..."') are overwritten."""
    block = bytearray(header(name, size=len(data)))
    for key, value in fields.items():
        offset = int(key.removeprefix("at_"))
        block[offset : offset + len(value)] = value
    return with_checksum(block) + data + bytes(-len(data) % 512)


def gnu_long(name: str, kind: bytes = b"L") -> bytes:
    return member("././@LongLink", name.encode() + b"\0", typeflag=kind)


def ours_written() -> bytes:
    encoder = HeaderEncoder(mtime=1)
    long = b"gnu/store/" + b"x" * 120 + b"/" + b"y" * 120
    parts = [encoder.encode(b"gnu/", DIRTYPE, 0o555)]
    for name, content in ((b"gnu/a", b"hello"), (long, b"long"), (b"gnu/caf\xc3\xa9", b"")):
        parts += [encoder.encode(name, REGTYPE, 0o444, len(content)), content]
        parts.append(bytes(-len(content) % 512))
    return b"".join(parts) + END


def tarfile_written(form: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=form) as archive:
        for name, content in (("d/" + "n" * 130, b"one"), ("e", b"two")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uname = len(content), 7, "u" * 40
            archive.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo("l")
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 150
        archive.addfile(link)
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
    return buffer.getvalue()


CORPUS: dict[str, bytes] = {
    # Controls: archives every reader reads alike, which we must read.
    "ours": ours_written(),
    "tarfile-gnu": tarfile_written(tarfile.GNU_FORMAT),
    "tarfile-pax": tarfile_written(tarfile.PAX_FORMAT),
    "docker-archive": docker_archive(),
    "one-zero-block-at-the-end": member("a", b"1") + bytes(512),
    # Typeflag NUL and a trailing slash: a directory, so what follows is a member.
    "nul-type-directory": tar(
        member("dir/", b"\0" * 512, typeflag=b"\0")[:512] + member("hidden", b"evil"),
    ),
    "nul-type-directory-by-pax-path": tar(
        pax(pax_record("path", "dir/")), member("dir", b"data", typeflag=b"\0")
    ),
    # PAX scoping.
    "two-pax-headers": tar(
        pax(pax_record("path", "first")), pax(pax_record("path", "second")), member("x", b"1")
    ),
    "two-pax-headers-disjoint": tar(
        pax(pax_record("path", "first")), pax(pax_record("uname", "u")), member("x", b"1")
    ),
    "two-equal-pax-headers": tar(
        pax(pax_record("path", "same")), pax(pax_record("path", "same")), member("x", b"1")
    ),
    "pax-then-global": tar(
        pax(pax_record("path", "lost")),
        member("././@PaxHeader", pax_record("comment", "c"), typeflag=b"g"),
        member("x", b"1"),
    ),
    "global-with-path": tar(
        member("././@PaxHeader", pax_record("path", "everywhere"), typeflag=b"g"),
        member("x", b"1"),
        member("y", b"2"),
    ),
    "global-with-comment": tar(
        member("pax_global_header", pax_record("comment", "a1b2c3"), typeflag=b"g"),
        member("x", b"1"),
    ),
    "pax-nul-in-path": tar(pax(pax_record("path", "a\0b")), member("x", b"1")),
    "pax-nul-padding": tar(
        member("././@PaxHeader", pax_record("path", "p") + b"\0" * 20, typeflag=b"x"),
        member("x", b"1"),
    ),
    "pax-empty-path": tar(pax(pax_record("path", "")), member("x", b"1")),
    "pax-empty-uid": tar(pax(pax_record("uid", "")), member("x", b"1")),
    "pax-size": tar(pax(pax_record("size", "3")), member("x", b"abc", size=0)),
    "pax-mtime-fraction": tar(pax(pax_record("mtime", "1.5")), member("x", b"1")),
    "pax-mtime-signed": tar(pax(pax_record("mtime", "+5")), member("x", b"1")),
    "pax-sparse": tar(pax(pax_record("GNU.sparse.name", "real")), member("x", b"1")),
    "pax-at-the-end": member("x", b"1") + pax(pax_record("path", "p")) + END,
    # GNU long names against PAX paths.
    "long-name-then-pax": tar(gnu_long("long"), pax(pax_record("path", "pax")), member("x", b"1")),
    "pax-then-long-name": tar(pax(pax_record("path", "pax")), gnu_long("long"), member("x", b"1")),
    "long-name-equal-to-pax": tar(
        pax(pax_record("path", "same")), gnu_long("same"), member("x", b"1")
    ),
    "two-long-names": tar(gnu_long("first"), gnu_long("second"), member("x", b"1")),
    "long-name-with-nul": tar(
        member("././@LongLink", b"real\0hidden", typeflag=b"L"), member("x", b"1")
    ),
    "long-link-then-pax": tar(
        gnu_long("long", b"K"), pax(pax_record("linkpath", "pax")), member("l", typeflag=b"2")
    ),
    # The prefix field.
    "posix-prefix": tar(edited("name", b"1", at_345=b"prefix")),
    "gnu-magic-with-prefix": tar(edited("name", b"1", at_257=b"ustar  \0", at_345=b"prefix")),
    "v7-with-owner": tar(edited("name", b"1", at_257=b"\0" * 8, at_265=b"someone")),
    "star-prefix": tar(edited("name", b"1", at_345=b"p" * 140, at_508=b"tar\0")),
    # Zero blocks and numbers.
    "zero-block-then-header": member("a", b"1") + bytes(512) + member("b", b"2") + END,
    "size-leading-nul": tar(edited("x", b"A" * 10, at_124=b"\x00000000012\0")),
    "size-base256-high-bits": tar(edited("x", b"A" * 512, at_124=b"\x81" + bytes(10) + b"\x00")),
    "size-tab": tar(edited("x", b"A" * 10, at_124=b"\t0000000012\0")),
    "mode-garbage": tar(edited("x", b"1", at_100=b"07z4\0\0\0\0")),
    "devmajor-garbage": tar(edited("x", b"1", at_329=b"zz\0")),
    # Types.
    "type-7": tar(member("x", b"contiguous", typeflag=b"7")),
    "unknown-type": tar(member("x", b"data", typeflag=b"A"), member("y", b"2")),
    "directory-with-size": tar(
        edited("d/", b"", at_156=b"5", at_124=b"00000001000\0"), member("after", b"1")
    ),
    "hard-link-to-later": tar(member("l", typeflag=b"1", linkname="t"), member("t", b"1")),
}


@pytest.mark.tools
def test_the_corpus_is_read_as_go_reads_it_or_refused(oracle: Path, tmp_path: Path) -> None:
    names = list(CORPUS)
    readings = go(oracle, [CORPUS[name] for name in names], tmp_path)
    broken = {}
    for name, go_reading in zip(names, readings, strict=True):
        why = disagreement(CORPUS[name], go_reading)
        if why is not None:
            broken[name] = why
    assert broken == {}
    # The controls are read, not refused; and the tricks the issue names are refused.
    for control in ("ours", "tarfile-gnu", "tarfile-pax", "docker-archive", "global-with-comment"):
        assert not isinstance(ours(CORPUS[control]), str), control
    for trick in (
        "two-pax-headers",
        "pax-then-long-name",
        "zero-block-then-header",
        "pax-nul-in-path",
        "size-leading-nul",
        "gnu-magic-with-prefix",
    ):
        assert isinstance(ours(CORPUS[trick]), str), trick
    # Typeflag NUL with a trailing slash is read as a directory, as Go reads it.
    assert ours(CORPUS["nul-type-directory"]) == readings[names.index("nul-type-directory")]
    assert [e[:2] for e in ours(CORPUS["nul-type-directory"])] == [("dir", "5"), ("hidden", "0")]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation of a tar, mostly in its headers, checksums kept right."""
    mutated = bytearray(data)
    blocks = len(mutated) // 512
    operation = rng.randrange(7)
    if operation == 6:  # any byte: contents, PAX records, long names
        where = rng.randrange(len(mutated))
        mutated[where] = rng.choice(b"\x00 /=\n0123456789x")
        return bytes(mutated)
    if operation == 0:  # truncate
        return bytes(mutated[: rng.randrange(len(mutated))])
    if operation == 1:  # repeat or drop a block
        start = rng.randrange(blocks) * 512
        if rng.random() < 0.5:
            return bytes(mutated[:start] + mutated[start : start + 512] + mutated[start:])
        return bytes(mutated[:start] + mutated[start + 512 :])
    # Change a few bytes of a header (a block whose checksum is right), then fix it.
    headers = [
        i * 512
        for i in range(blocks)
        if mutated[i * 512 : i * 512 + 512].count(0) < 512 and _checks(mutated[i * 512 :][:512])
    ]
    if not headers:
        return bytes(mutated)
    start = rng.choice(headers)
    interesting = b"\x00 /0157xgLK\x80\xff\n=.5"
    for _ in range(rng.randint(1, 3)):
        where = start + rng.choice([*range(100), *range(100, 157), 156, 156, *range(257, 500)])
        mutated[where] = rng.choice(interesting) if rng.random() < 0.7 else rng.randrange(256)
    if operation != 2:  # most keep a right checksum: the reader must get past it
        mutated[start : start + 512] = with_checksum(mutated[start : start + 512])
    return bytes(mutated)


def _checks(block: bytes | bytearray) -> bool:
    try:
        stored = int(bytes(block[148:154]), 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 256 + sum(block[156:])


SEEDS = 8000


@pytest.mark.tools
def test_mutated_archives_are_read_as_go_reads_them_or_refused(
    oracle: Path, tmp_path: Path
) -> None:
    """A seeded fuzz: a few thousand mutations, each read alike by all, or refused.

    `GUIX_IMAGE_FUZZ_SEEDS=200000 pytest tests/test_differential.py -k mutated` runs longer.
    """
    count = int(os.environ.get("GUIX_IMAGE_FUZZ_SEEDS", SEEDS))
    bases = [CORPUS[name] for name in ("ours", "tarfile-gnu", "tarfile-pax", "docker-archive")]
    rng = random.Random(20261203)
    mutants = [mutate(rng.choice(bases), rng) for _ in range(count)]
    started = time.monotonic()
    readings = go(oracle, mutants, tmp_path)
    broken = []
    refused = 0
    for number, (data, go_reading) in enumerate(zip(mutants, readings, strict=True)):
        why = disagreement(data, go_reading)
        refused += isinstance(ours(data), str)
        if why is not None:
            (tmp_path / f"broken-{number}.tar").write_bytes(data)
            broken.append(f"mutant {number}: {why}")
    assert broken[:5] == []
    # The mutations must exercise both outcomes, or they test little.
    assert 0.1 * count < refused < 0.9 * count
    assert time.monotonic() - started < 120


def test_a_reading_that_differs_is_caught() -> None:
    """The comparison itself: a reader that hid a member would be reported."""
    data = CORPUS["nul-type-directory"]
    go_says: Reading = [("dir", "5", "", hashlib.sha256(b"").hexdigest())]
    assert disagreement(data, go_says) is not None


# -- real loaders ---------------------------------------------------------------------


def evil_archives() -> dict[str, bytes]:
    """Docker archives where a reader that differs from Go's would see another manifest."""
    layer = CORPUS["ours"]
    configs = {
        cmd: image_config([sha256(layer)], config={"Cmd": [cmd]}) for cmd in ("/good", "/evil")
    }

    def manifest(cmd: str) -> bytes:
        entry = {"Config": config_name(configs[cmd]), "RepoTags": [f"trick:{cmd[1:]}"]}
        return json.dumps([{**entry, "Layers": ["layer.tar"]}]).encode()

    common = [member("layer.tar", layer), *(member(config_name(c), c) for c in configs.values())]
    evil = member("manifest.json", manifest("/evil"))
    good = member("manifest.json", manifest("/good"))
    return {
        "nul-type-directory": tar(*common, edited("x/", evil, at_156=b"\0"), good),
        "two-pax-headers": tar(
            *common,
            pax(pax_record("path", "manifest.json")),
            pax(pax_record("uname", "u")),
            member("decoy", manifest("/evil")),
            good,
        ),
        "long-name-against-pax": tar(
            *common,
            pax(pax_record("path", "decoy")),
            gnu_long("manifest.json"),
            member("x", manifest("/evil")),
            good,
        ),
        "zero-block-then-manifest": tar(*common, good)[:-1024] + bytes(512) + evil + END,
    }


def podman_cmd(storage: Path, archive: Path) -> list[str] | None:
    """The Cmd podman loads from `archive`, or None if it does not load it."""
    base = ["podman", "--storage-driver", "vfs", "--root", str(storage / "root")]
    base += ["--runroot", str(storage / "run")]
    loaded = subprocess.run(
        [*base, "load", "-q", "-i", str(archive)], capture_output=True, text=True
    )
    if loaded.returncode != 0:
        return None
    image = loaded.stdout.strip().rsplit(" ", 1)[-1]
    inspected = subprocess.run(
        [*base, "image", "inspect", image, "--format", "{{json .Config.Cmd}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    subprocess.run([*base, "rmi", "-a", "-f"], capture_output=True)
    return json.loads(inspected.stdout)  # type: ignore[no-any-return]


def docker_cmd(archive: Path) -> list[str] | None:
    """The Cmd `docker load` loads from `archive`, or None if it does not load it."""
    loaded = subprocess.run(["docker", "load", "-i", str(archive)], capture_output=True, text=True)
    if loaded.returncode != 0:
        return None
    image = loaded.stdout.strip().rsplit(" ", 1)[-1]
    try:
        inspected = subprocess.run(
            ["docker", "image", "inspect", image, "--format", "{{json .Config.Cmd}}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(inspected.stdout)  # type: ignore[no-any-return]
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)


@pytest.mark.tools
@pytest.mark.skipif(not docker_answers(), reason="no Docker daemon answers `docker info`")
@pytest.mark.parametrize("trick", sorted(evil_archives()))
def test_docker_loads_what_we_read_or_we_refuse(trick: str, tmp_path: Path, cli: Cli) -> None:
    archive = tmp_path / "trick.tar"
    archive.write_bytes(evil_archives()[trick])
    loaded = docker_cmd(archive)
    result = cli("inspect", str(archive), "--json")
    if result.exit_code != 2:
        assert json.loads(result.stdout)["config"]["Cmd"] == loaded
    assert result.exit_code == 2


@pytest.mark.tools
@pytest.mark.parametrize("trick", sorted(evil_archives()))
def test_podman_loads_what_we_read_or_we_refuse(
    trick: str, tmp_path: Path, podman_storage: Path, cli: Cli
) -> None:
    archive = tmp_path / "trick.tar"
    archive.write_bytes(evil_archives()[trick])
    loaded = podman_cmd(podman_storage, archive)
    for command in (["inspect", "--json"], ["verify", "--json"]):
        result = cli(*command[:1], str(archive), *command[1:])
        if result.exit_code == 2:
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            continue
        if command[0] == "verify" and result.exit_code == 1:  # unreadable: a failed check
            checks = json.loads(result.stdout)["checks"]
            assert [c["name"] for c in checks if not c["ok"]] == ["archive readable"]
            continue
        assert loaded is not None, f"{command}: we read what podman refuses"
        if command[0] == "inspect":
            assert json.loads(result.stdout)["config"]["Cmd"] == loaded
    # These tricks are all refused: a reader that is not Go's sees another image.
    assert cli("inspect", str(archive)).exit_code == 2
