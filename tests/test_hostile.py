"""Hostile archives: every reader must refuse them cleanly, quickly and in bounded memory.

Each case builds its archive here, byte by byte where `tarfile` cannot write
the trick (with the builders of tests/support/archives.py), runs one or more
commands on it and states the outcome: exit 2 with exactly one `Error: ` line
on stderr, or for `verify` a layer-level problem reported as a FAIL line with
exit 1, or (for the controls) success. Every run also checks that nothing was
written anywhere (nothing is ever extracted), that no traceback leaked and that
it finished in time. Bombs and cases that could hang or eat memory run in a
child process, under an address-space limit and a watchdog, and their peak RSS
is measured.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guix_image.cli import main

from .support.archives import (
    BLOCK,
    LAYER,
    LAYER_NAME,
    GiB,
    MiB,
    base256,
    blob_name,
    config_name,
    descriptor,
    docker_archive,
    docker_entries,
    gzip_of_zeros,
    hardlink,
    header,
    image_config,
    layer_with_entries,
    manifest_of,
    many_members,
    member,
    oci_archive,
    oci_files,
    padded,
    pax,
    pax_record,
    sha256,
    symlink,
    tar,
    the_manifest,
    without,
    write_layout,
    zstd_of_zeros,
)

ROOT = Path(__file__).resolve().parent.parent

# -- running the CLI ------------------------------------------------------------

# The child's peak RSS is read from /proc/self/status (VmHWM) as it exits:
# `os.wait4`'s ru_maxrss would not do, since Linux carries the maximum over
# from the forked parent (pytest, holding these archives) across execve.
CHILD = """
import atexit, resource, sys
limit, report = int(sys.argv.pop(1)), sys.argv.pop(1)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def peak():
    try:
        with open("/proc/self/status") as status:
            kilobytes = [line.split()[1] for line in status if line.startswith("VmHWM:")]
    except OSError:
        return
    with open(report, "w") as out:
        out.write(kilobytes[0])

atexit.register(peak)
from guix_image.cli import main
main(prog_name="guix-image")
"""
CHILD_ADDRESS_SPACE = GiB


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float | None = None  # measured for isolated runs only
    timed_out: bool = False
    escaped: BaseException | None = None  # an exception that got out of main()


def run_in_process(cli_runner: CliRunner, args: list[str], stdin: bytes | None) -> Outcome:
    start = time.monotonic()
    result = cli_runner.invoke(main, args, input=stdin)
    seconds = time.monotonic() - start
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stdout, result.stderr, seconds, escaped=escaped)


def run_isolated(args: list[str], stdin: bytes | None, cwd: Path, timeout: float) -> Outcome:
    """The CLI in a child process: address space limited, a watchdog, stdin a real pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        out_path, err_path = Path(scratch) / "out", Path(scratch) / "err"
        command = [sys.executable, "-c", CHILD, str(CHILD_ADDRESS_SPACE), str(report), *args]
        with out_path.open("wb") as out, err_path.open("wb") as err:
            start = time.monotonic()
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env,
            )
            watchdog = threading.Timer(timeout, process.kill)
            watchdog.start()
            if stdin is not None:
                threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True).start()
            try:
                process.wait()
            finally:
                watchdog.cancel()
            seconds = time.monotonic() - start
        peak = int(report.read_text()) / 1024 if report.exists() else None
        return Outcome(
            process.returncode,
            out_path.read_text("utf-8", "replace"),
            err_path.read_text("utf-8", "replace"),
            seconds,
            peak_rss_mb=peak,
            timed_out=seconds >= timeout,
        )


def _feed(pipe: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader may stop early: that is allowed
        try:
            pipe.write(data)
        finally:
            pipe.close()


# -- the corpus -----------------------------------------------------------------

Built = bytes | Path  # archive bytes (written to hostile.tar) or a path made by the builder


@dataclass(frozen=True)
class Run:
    """A command and what it must do.

    `command` is split on spaces; `{}` is the hostile archive, `{good}` a clean
    one, and `-` feeds the hostile archive on standard input. `code` 2 means
    one line on stderr matching `pattern`; 0 or 1 mean `pattern` is searched
    in stdout (a FAIL line for verify) and stderr holds warnings at most.
    """

    command: str
    code: int
    pattern: str


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Built]
    runs: tuple[Run, ...]
    isolated: bool = False  # run in a child process (bombs, hangs, memory)
    seconds: float = 5.0  # each run must finish within this, times time_limit_factor()
    max_rss_mb: float = 250.0  # peak RSS of an isolated run
    writes: bool = False  # the command is allowed to create files (diff-layers --report-dir)


def refused(pattern: str, *commands: str) -> tuple[Run, ...]:
    """Exit 2 with one error line matching `pattern` for each command (default inspect,
    verify); for verify, a damaged archive is one failed check (exit 1) saying so."""
    return tuple(
        failed_check("archive readable: .*" + pattern, c)
        if c.startswith("verify")
        else Run(c, 2, pattern)
        for c in commands or ("inspect {}", "verify {}")
    )


def ok(command: str, pattern: str) -> Run:
    return Run(command, 0, pattern)


def failed_check(pattern: str, command: str = "verify {}") -> Run:
    return Run(command, 1, r"(?m)^FAIL  " + pattern)


SUMMARY = r"(?m)^Total size: .* in 1 layer, "


def static(build: Callable[[], bytes]) -> Callable[[Path], bytes]:
    return lambda tmp_path: build()


# Outer archive: names, links, duplicates.


def outer_dotdot_manifest() -> bytes:
    entries = docker_entries()
    return tar(*without(entries, "manifest.json"), member("../manifest.json", manifest_of(entries)))


def outer_dotdot_inside() -> bytes:
    return docker_archive(member("a/../../x", b"x"))


def outer_absolute_names() -> bytes:
    entries = docker_entries(names=["/abc/layer.tar"], layer_names=["abc/layer.tar"])
    return tar(*(member("/" + name.lstrip("/"), data) for name, data in entries))


def manifest_symlink() -> bytes:
    entries = docker_entries()
    return tar(
        *without(entries, "manifest.json"),
        member("real.json", manifest_of(entries)),
        symlink("manifest.json", "real.json"),
    )


def layer_symlink_inside() -> bytes:
    """What `docker save` writes for a repeated layer: a symlink to the first copy."""
    entries = docker_entries([LAYER, LAYER])
    return tar(*without(entries, "002/layer.tar"), symlink("002/layer.tar", "../001/layer.tar"))


def layer_symlink_escapes() -> bytes:
    entries = docker_entries()
    return tar(*without(entries, LAYER_NAME), symlink(LAYER_NAME, "../../etc/passwd"))


def layer_symlink_loop() -> bytes:
    entries = docker_entries(names=["a.tar"])
    return tar(*without(entries, "a.tar"), symlink("a.tar", "b.tar"), symlink("b.tar", "a.tar"))


def layer_hardlink_escapes() -> bytes:
    entries = docker_entries()
    return tar(*without(entries, LAYER_NAME), hardlink(LAYER_NAME, "../etc/passwd"))


def duplicate_manifest() -> bytes:
    entries = docker_entries()
    return docker_archive(member("manifest.json", manifest_of(entries)))


def duplicate_dot_slash() -> bytes:
    entries = docker_entries()
    return tar(member("./manifest.json", manifest_of(entries)), *(member(n, d) for n, d in entries))


# Outer archive: broken tar structure.


def truncated(cut: Callable[[bytes], int]) -> Callable[[], bytes]:
    def build() -> bytes:
        data = docker_archive()
        return data[: cut(data)]

    return build


def cut_in_layer(data: bytes) -> int:
    return BLOCK + len(LAYER) // 2  # the first member is the layer


def cut_in_manifest_header(data: bytes) -> int:
    return data.rindex(b"manifest.json\0") + 100


def bad_checksum() -> bytes:
    entries = docker_entries()
    first = header(LAYER_NAME, size=len(LAYER), checksum=0o1234) + padded(LAYER)
    return tar(first, *without(entries, LAYER_NAME))


def sized(size_field: bytes) -> Callable[[], bytes]:
    """The layer member's size field replaced by `size_field` (its content stays LAYER)."""

    def build() -> bytes:
        entries = docker_entries()
        return tar(
            header(LAYER_NAME, size_field=size_field) + padded(LAYER),
            *without(entries, LAYER_NAME),
        )

    return build


def negative_octal_layer() -> bytes:
    """The layer member claims size -1 (in octal) and has no content."""
    entries = docker_entries()
    return tar(header(LAYER_NAME, size_field=b"-0000000001\0"), *without(entries, LAYER_NAME))


def arabic_digits_size() -> bytes:
    """A 12-byte member whose PAX size is written in Arabic-Indic digits."""
    notes = header("notes", size=0) + padded(b"x" * 12)
    return docker_archive(pax(pax_record("size", "\u0661\u0662")), notes)


def huge_size() -> bytes:
    """A 10-byte member that claims 2**40 bytes, then nothing."""
    return header(LAYER_NAME, size_field=base256(2**40)) + b"x" * 10


def pax_before_layer(*records: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        return tar(pax(*records), *(member(n, d) for n, d in docker_entries()))

    return build


def pax_too_large() -> bytes:
    return header("././@PaxHeader", typeflag=b"x", size=MiB + 1) + bytes(BLOCK)


def pax_size_disagrees() -> bytes:
    entries = docker_entries()
    return tar(
        pax(pax_record("size", str(len(LAYER) + 10))),
        member(LAYER_NAME, LAYER),
        *without(entries, LAYER_NAME),
    )


def too_many_members() -> bytes:
    return many_members(200_001)


# Metadata: manifest.json and the config.


def with_manifest(manifest: bytes | None) -> Callable[[], bytes]:
    def build() -> bytes:
        if manifest is None:
            return tar(*without(docker_entries(), "manifest.json"))
        return docker_archive(manifest=manifest)

    return build


def with_config(config: bytes) -> Callable[[], bytes]:
    return lambda: docker_archive(config=config)


def config_missing() -> bytes:
    entries = docker_entries()
    return tar(*without(entries, entries[1][0]))


def count_mismatch() -> bytes:
    return docker_archive(diff_ids=[sha256(LAYER), sha256(b"another")])


def layer_missing() -> bytes:
    return docker_archive(layer_names=["nope/layer.tar"])


def config_name_newline() -> bytes:
    manifest = json.dumps([{"Config": "evil\nOK: every check passed.", "Layers": []}])
    return docker_archive(manifest=manifest.encode())


def many_images_one_config() -> bytes:
    """3,000 manifest entries sharing one 4 MB config: each must not cost 8 MB of memory."""
    config = image_config([sha256(LAYER)], padding="x" * 4_000_000)
    entry = {"Config": config_name(config), "Layers": [LAYER_NAME]}
    return docker_archive(config=config, manifest=json.dumps([entry] * 3000).encode())


def layer_refs(count: int, layer: bytes) -> bytes:
    """An image whose `count` layers are all the one member "a"."""
    entries = docker_entries([layer], names=["a"], layer_names=["a"] * count)
    return tar(*(member(n, d) for n, d in entries))


def many_layer_refs() -> bytes:
    return layer_refs(150_000, tar(*(member(f"f{i}") for i in range(2000))))


def layer_refs_at_the_limit() -> bytes:
    """1,000 layers (the limit), all one 200 kB gzip member of 20,000 entries (10 MB)."""
    return layer_refs(1000, layer_with_entries(20_000))


# Layers: compression, bombs, structure, entries.


def gzip_bomb() -> bytes:
    bomb = gzip_of_zeros(GiB)
    assert len(bomb) < 2 * MiB
    return docker_archive(layers=[bomb], diff_ids=[sha256(b"anything")])


def zstd_bomb() -> bytes:
    bomb = zstd_of_zeros(GiB)
    assert len(bomb) < 2 * MiB
    return docker_archive(layers=[bomb], diff_ids=[sha256(b"anything")])


def gzip_garbage() -> bytes:
    return docker_archive(layers=[b"\x1f\x8b\x08\x00" + b"\xa5\x5a" * 600])


def corrupt_first_header() -> bytes:
    layer = bytearray(LAYER)
    layer[0] ^= 1
    return docker_archive(layers=[bytes(layer)])


def not_tar() -> bytes:
    return docker_archive(layers=[b"this is not a tar archive\n" * 40])


def truncated_layer() -> bytes:
    layer = tar(member("big", b"b" * 3000))
    return docker_archive(layers=[layer[:1500]])


def bzip2_layer() -> bytes:
    """bzip2 magic over garbage (bzip2 and xz layers are read, as docker loads them)."""
    return docker_archive(layers=[b"BZh91AY&SY" + bytes(600)])


def layer_entry_traversal() -> bytes:
    layer = tar(
        member("../../etc/passwd", b"root::0:0::/:/bin/sh\n"),
        hardlink("innocent", "../../../etc/shadow"),
        symlink("escape", "../../../../.."),
        member("escape/owned", b"through the symlink\n"),
    )
    return docker_archive(layers=[layer])


def layer_duplicates() -> bytes:
    return docker_archive(layers=[tar(member("a", b"1"), member("./a", b"2"), member("b"))])


def layer_many_entries() -> bytes:
    return docker_archive(layers=[layer_with_entries(120_000)])


def entry_pax(*records: bytes) -> Callable[[], bytes]:
    """A layer whose second entry carries the PAX `records`."""
    return lambda: docker_archive(
        layers=[tar(member("a", b"a"), pax(*records), member("b", b"abc"))]
    )


def entry_negative_octal_size() -> bytes:
    layer = tar(member("x", size_field=b"-0000000001\0"), member("y", b"abc"))
    return docker_archive(layers=[layer])


def undecodable_names() -> bytes:
    return docker_archive(layers=[tar(member(b"bad-\xff\xfe-name", b"x"))])


def report_entry(name: str) -> Callable[[Path], Path]:
    """Two images whose layer has entry `name` with different contents; diff writes a report."""

    def build(tmp_path: Path) -> Path:
        for side, content in (("a", b"one"), ("b", b"two!")):
            layer = tar(pax(pax_record("path", name)), member("placeholder", content))
            (tmp_path / f"{side}.tar").write_bytes(docker_archive(layers=[layer]))
        return tmp_path / "a.tar"

    return build


# OCI layouts, as directories and as archives.


def oci(
    build: Callable[[dict[str, bytes]], None] | None = None, **options: object
) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        files = oci_files(**options)  # type: ignore[arg-type]
        if build is not None:
            build(files)
        return write_layout(tmp_path / "layout", files)

    return make


def oci_tar(**options: object) -> Callable[[], bytes]:
    return lambda: oci_archive(oci_files(**options))  # type: ignore[arg-type]


def blob_symlink(tmp_path: Path) -> Path:
    layout = oci()(tmp_path)
    outside = tmp_path / "outside-blob"
    path = layout / blob_name(LAYER)
    shutil.move(path, outside)
    path.symlink_to(outside)
    return layout


def blobs_through_symlink(tmp_path: Path) -> Path:
    layout = oci()(tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(layout / "blobs", outside)
    (layout / "blobs").symlink_to(outside)
    return layout


def index_symlink(tmp_path: Path) -> Path:
    layout = oci()(tmp_path)
    outside = tmp_path / "outside-index.json"
    shutil.move(layout / "index.json", outside)
    (layout / "index.json").symlink_to(outside)
    return layout


def wrong_manifest_bytes(files: dict[str, bytes]) -> None:
    """The manifest's blob holds other bytes (a valid manifest, one byte longer)."""
    name = the_manifest(files)
    files[name] = files[name] + b"\n"


def index_fan_out() -> bytes:
    """Indexes 4 deep, each listing the next 30 times: 30**5 manifests, all the same."""
    files = oci_files()
    inner = files[the_manifest(files)]
    media_type = "application/vnd.oci.image.manifest.v1+json"
    for _ in range(5):
        listing = [descriptor(inner, media_type)] * 30
        media_type = "application/vnd.oci.image.index.v1+json"
        inner = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": listing})
        inner = inner.encode()
        files[blob_name(inner)] = inner
    files["index.json"] = inner
    return oci_archive(files)


def manifests_share_one_config() -> bytes:
    """index.json lists one manifest 1,000 times (the limit); its config is 4 MB."""
    files = oci_files(config=image_config([sha256(LAYER)], padding="x" * 4_000_000))
    listing = [descriptor(files[the_manifest(files)])] * 1000
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": listing}).encode()
    return oci_archive(files)


def large_manifests(distinct: int, listings: int) -> Callable[[], bytes]:
    """index.json lists `distinct` manifests of almost 1 MiB (the limit), `listings` times."""

    def build() -> bytes:
        config = image_config([sha256(LAYER)])
        files = oci_files(config=config)
        manifests = [
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
                    "layers": [descriptor(LAYER, "application/vnd.oci.image.layer.v1.tar")],
                    "annotations": {"padding": f"{n}" + "x" * ((1 << 20) - 1000)},
                }
            ).encode()
            for n in range(distinct)
        ]
        for manifest in manifests:
            files[blob_name(manifest)] = manifest
        listing = [descriptor(manifests[n % distinct]) for n in range(listings)]
        files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": listing}).encode()
        return oci_archive(files)

    return build


def oci_layers(count: int) -> Callable[[], bytes]:
    def build() -> bytes:
        files = oci_files()
        name = the_manifest(files)
        manifest = json.loads(files[name])
        manifest["layers"] = manifest["layers"] * count
        files["index.json"] = json.dumps(
            {"schemaVersion": 2, "manifests": [descriptor(json.dumps(manifest).encode())]}
        ).encode()
        files[blob_name(json.dumps(manifest).encode())] = json.dumps(manifest).encode()
        return oci_archive(files)

    return build


def bad_digest_descriptor(digest: str) -> Callable[[], bytes]:
    def build() -> bytes:
        files = oci_files()
        files["index.json"] = json.dumps(
            {"schemaVersion": 2, "manifests": [{"digest": digest, "size": 10}]}
        ).encode()
        return oci_archive(files)

    return build


ALL = ("inspect {}", "verify {}", "inspect -")
DIGEST_MISMATCH = r"manifest blobs/sha256/[0-9a-f]{64} (digest|size): expected "

CASES = [
    # 1-2. Outer member names.
    Case(
        "outer-dotdot-manifest",
        static(outer_dotdot_manifest),
        refused(r"member name '\.\./manifest\.json' climbs out of the archive", *ALL),
    ),
    Case(
        "outer-dotdot-inside-name",
        static(outer_dotdot_inside),
        refused(r"member name 'a/\.\./\.\./x' climbs out of the archive", *ALL),
    ),
    Case(
        "outer-absolute-names-accepted",
        static(outer_absolute_names),
        (ok("inspect {}", SUMMARY), ok("verify {}", "OK: every check passed"), ok("inspect -", "")),
    ),
    # 3-4. Links in the outer archive.
    Case(
        "manifest-is-symlink",
        static(manifest_symlink),
        refused(r"manifest\.json is a link; refusing to follow it", *ALL),
    ),
    Case(
        "layer-symlink-inside-accepted",
        static(layer_symlink_inside),
        (ok("inspect {}", r"in 2 layers"), ok("verify {}", "OK: every check passed")),
    ),
    Case(
        "layer-symlink-escapes",
        static(layer_symlink_escapes),
        refused(r"'001/layer\.tar' is a link that escapes the archive", *ALL),
    ),
    Case(
        "layer-symlink-loop", static(layer_symlink_loop), refused(r"'a\.tar' is a link that loops")
    ),
    Case(
        "layer-hardlink-escapes",
        static(layer_hardlink_escapes),
        refused(r"'001/layer\.tar' is a link that escapes the archive", *ALL),
    ),
    # 5. Duplicates.
    Case(
        "duplicate-manifest",
        static(duplicate_manifest),
        refused(
            r"duplicate member 'manifest\.json' \(also 'manifest\.json'\)",
            *ALL,
            "diff-layers {good} -",
        ),
    ),
    Case(
        "duplicate-dot-slash",
        static(duplicate_dot_slash),
        refused(r"duplicate member '[^']*manifest\.json' \(also '[^']*manifest\.json'\)", *ALL),
    ),
    # 6. manifest.json.
    Case(
        "manifest-null",
        static(with_manifest(b"null")),
        refused("manifest.json must be a list of images, not null", *ALL),
    ),
    Case(
        "manifest-object",
        static(with_manifest(b"{}")),
        refused("manifest.json must be a list of images, not dict"),
    ),
    Case("manifest-empty", static(with_manifest(b"[]")), refused("manifest.json lists no images")),
    Case(
        "manifest-string",
        static(with_manifest(b'"x"')),
        refused("manifest.json must be a list of images, not str"),
    ),
    Case(
        "manifest-number-entry",
        static(with_manifest(b"[5]")),
        refused(r"manifest\.json\[0\] is not an object"),
    ),
    Case(
        "manifest-not-json",
        static(with_manifest(b"[{,")),
        refused("manifest.json is not valid JSON", *ALL),
    ),
    Case(
        "manifest-missing",
        static(with_manifest(None)),
        refused("not an image archive: it has no manifest.json or index.json", *ALL),
    ),
    # 7. The config.
    Case(
        "config-missing",
        static(config_missing),
        refused(r"config '[0-9a-f]{64}\.json' is not in the archive", *ALL),
    ),
    Case("config-not-json", static(with_config(b"{nope")), refused(r"config .* is not valid JSON")),
    Case("config-list", static(with_config(b"[1, 2]")), refused("is not a JSON object")),
    Case(
        "config-no-rootfs",
        static(with_config(b'{"architecture": "amd64"}')),
        refused("has no rootfs.diff_ids list"),
    ),
    Case(
        "config-diff-ids-not-list",
        static(with_config(b'{"rootfs": {"diff_ids": "sha256:00"}}')),
        refused("has no rootfs.diff_ids list"),
    ),
    Case(
        "config-diff-id-not-sha256",
        static(with_config(image_config(["md5:d41d8cd98f00b204e9800998ecf8427e"]))),
        refused(r"rootfs\.diff_ids\[0\] is not a sha256 digest: 'md5:", *ALL),
    ),
    # 8-9. Layers the manifest names.
    Case(
        "layer-count-mismatch",
        static(count_mismatch),
        (
            ok("inspect {}", SUMMARY),  # inspect reports the layers there are
            failed_check("layer count: expected 2, found 1"),
            failed_check("layer count: expected 2, found 1", "verify -"),
        ),
    ),
    Case(
        "layer-missing",
        static(layer_missing),
        refused(r"'nope/layer\.tar' is not in the archive", *ALL),
    ),
    # 10-12. Broken tar structure.
    Case(
        "truncated-in-member",
        static(truncated(cut_in_layer)),
        refused("truncated archive: the stream ends inside member content", *ALL),
    ),
    Case(
        "truncated-in-header",
        static(truncated(cut_in_manifest_header)),
        refused("truncated archive: the stream ends inside header", *ALL),
    ),
    Case(
        "bad-header-checksum",
        static(bad_checksum),
        refused(r"at byte 0: bad header checksum", *ALL),
    ),
    Case(
        "negative-size-base256",
        static(sized(b"\xff" * 12)),
        refused("at byte 0: negative size in header", *ALL),
    ),
    Case(
        "size-field-garbage",
        static(sized(b"0000000012x\0")),
        refused(r"at byte 0: bad size field b'0000000012x' in header", *ALL),
    ),
    Case(
        "size-field-negative-octal",
        static(negative_octal_layer),
        refused(r"at byte 0: bad size field b'-0000000001' in header", *ALL),
    ),
    Case(
        "pax-size-disagrees",
        static(pax_size_disagrees),
        refused(rf"PAX size {len(LAYER) + 10} disagrees with header size {len(LAYER)}", *ALL),
    ),
    Case(
        "pax-bad-record-length",
        static(pax_before_layer(b"xx path=a\n")),
        refused(r"malformed PAX header \(bad record length\)", *ALL),
    ),
    Case(
        "pax-record-length-too-long",
        static(pax_before_layer(b"99 path=a\n")),
        refused(r"malformed PAX header \(record length does not fit\)"),
    ),
    Case(
        "pax-record-without-equals",
        static(pax_before_layer(b"11 pathxyz\n")),
        refused(r"malformed PAX header \(record without key=value\)"),
    ),
    Case(
        "pax-header-over-1MiB",
        static(pax_too_large),
        refused(rf"extended header of {MiB + 1} bytes is too large", *ALL),
    ),
    Case(
        "gnu-long-name-climbs",
        static(
            lambda: docker_archive(
                member("././@LongLink", b"../../x\0", typeflag=b"L"), member("x")
            )
        ),
        refused(r"member name '\.\./\.\./x' climbs out of the archive"),
    ),
    Case(
        "pax-size-superscript-digit",
        static(pax_before_layer(pax_record("size", "\u00b2"))),
        refused(r"PAX size '\u00b2' is not a non-negative integer", *ALL),
    ),
    Case(
        "pax-size-arabic-digits",
        static(arabic_digits_size),
        refused(r"PAX size '\u0661\u0662' is not a non-negative integer"),
    ),
    Case(
        "huge-declared-size",
        static(huge_size),
        refused("truncated archive: the stream ends inside member content", *ALL),
        seconds=3,
    ),
    Case(
        "huge-declared-size-pipe",
        static(huge_size),
        refused("truncated archive: the stream ends inside member content", "inspect -"),
        isolated=True,
        seconds=5,
    ),
    Case(
        "too-many-members",
        lambda tmp_path: too_many_members(),
        refused(r"more than 100000 members; not an image archive", "inspect {}"),
        seconds=10,
    ),
    # 13-15. Layer blobs: bombs and bad data.
    Case(
        "gzip-bomb",
        static(gzip_bomb),
        (
            *refused(r"decompression stopped at \d+ bytes, .*decompression bomb", "inspect {}"),
            *refused(r"decompression bomb", "inspect -", "diff-layers {good} {}"),
            failed_check(r"layer 1 readable: .*decompression bomb"),
        ),
        isolated=True,
        seconds=10,
        max_rss_mb=200,
    ),
    Case(
        "zstd-bomb",
        static(zstd_bomb),
        (
            *refused(r"decompression stopped at \d+ bytes, .*decompression bomb", "inspect {}"),
            *refused(r"decompression bomb", "inspect -"),
            failed_check(r"layer 1 readable: .*decompression bomb"),
        ),
        isolated=True,
        seconds=10,
        max_rss_mb=200,
    ),
    Case(
        "gzip-garbage",
        static(gzip_garbage),
        (
            *refused(r"001/layer\.tar\)?: bad gzip data", "inspect {}", "inspect -"),
            failed_check(r"layer 1 readable: expected a complete tar, found .*bad gzip data"),
        ),
    ),
    Case(
        "layer-corrupt-first-header",
        static(corrupt_first_header),
        (
            *refused(r"001/layer\.tar\)?: not a tar archive", "inspect {}", "inspect -"),
            failed_check(r"layer 1 readable: expected a complete tar, found .*not a tar archive"),
        ),
    ),
    Case(
        "layer-not-tar",
        static(not_tar),
        (
            *refused(r"001/layer\.tar\)?: not a tar archive", "inspect {}", "inspect -"),
            failed_check(r"layer 1 readable: expected a complete tar, found .*not a tar archive"),
        ),
    ),
    Case(
        "layer-truncated",
        static(truncated_layer),
        (
            *refused(r"layer 1 .*truncated archive: the stream ends inside", "inspect {}"),
            *refused(r"truncated archive", "inspect -"),
            failed_check(r"layer 1 readable: .*truncated archive"),
        ),
    ),
    Case(
        "layer-bad-bzip2",
        static(bzip2_layer),
        (
            *refused(r"layer 1 \(.*\): bad bzip2 data", "inspect {}"),
            failed_check(r"layer 1 readable: .*bad bzip2 data"),
        ),
    ),
    Case(
        "layer-with-120000-entries",
        static(layer_many_entries),
        (ok("inspect {}", r"in 1 layer, 120000 paths"),),
        seconds=15,
    ),
    # 18-19. Layer entries: never extracted, reported by verify.
    Case(
        "layer-entries-climb-out",
        static(layer_entry_traversal),
        (
            ok("inspect {}", SUMMARY),
            ok("inspect {} --files 1", r"(?m) etc/passwd$"),
            failed_check(r"layer 1 paths inside the image: expected all, found .*etc/passwd"),
            failed_check(r"layer 1 paths inside the image: expected all, found .*innocent"),
            failed_check(r"layer 1 paths inside the image: .*etc/passwd", "verify -"),
        ),
    ),
    Case(
        "layer-duplicate-entries",
        static(layer_duplicates),
        (
            ok("inspect {}", SUMMARY),
            failed_check(r"layer 1 duplicate paths: expected none, found \./a"),
        ),
    ),
    Case(
        "layer-entry-pax-mtime-nan",
        static(entry_pax(pax_record("mtime", "nan"))),
        refused(r"PAX mtime 'nan' is not a number", "inspect {} --files --json"),
    ),
    Case(
        "layer-entry-negative-octal-size",
        static(entry_negative_octal_size),
        (
            *refused(r"bad size field", "diff-layers {good} {}"),  # it used to hang
            *refused(r"bad size field b'-0000000001' in header", "inspect {}"),
        ),
        isolated=True,
        seconds=4,
    ),
    Case(
        "report-dir-nul-in-name",
        report_entry("a\0b"),
        # Go's archive/tar refuses a NUL in a PAX path, so the reader does too,
        # before anything is written.
        refused(r"PAX record 'path' holds a NUL", "diff-layers {} b.tar --report-dir report"),
        writes=True,
    ),
    Case(
        "report-dir-name-too-long",
        report_entry("d/" + "n" * 300),
        refused(r"report directory", "diff-layers {} b.tar --report-dir report"),
        writes=True,
    ),
    # Error messages and output must survive hostile names.
    Case(
        "config-name-with-newline",
        static(config_name_newline),
        refused(r"is not in the archive", "inspect {}", "verify {}"),
    ),
    Case(
        "undecodable-entry-names",
        static(undecodable_names),
        (ok("inspect {} --files", r"bad-.*-name"),),
    ),
    # Amplification: small archives that make the readers do unbounded work.
    Case(
        "many-images-share-one-config",
        static(many_images_one_config),
        refused(r"images", "inspect {}"),
        isolated=True,
        seconds=8,
    ),
    Case(
        "oci-manifests-share-one-config",
        static(manifests_share_one_config),
        (ok("inspect {}", SUMMARY),),  # one manifest listed again is one image
        isolated=True,
        seconds=8,
    ),
    Case(
        "oci-large-manifest-listed-1000-times",
        static(large_manifests(1, 1000)),
        (ok("inspect {}", SUMMARY),),
        isolated=True,
        seconds=1,  # read once: 0.4 s where hashing is slow; 1,000 times: 8.5 s
    ),
    Case(
        "oci-200-large-manifests",
        static(large_manifests(200, 200)),
        refused(r"holds 200 images", "inspect {}"),
        isolated=True,  # memory: not every manifest is kept (0.4 GB if they were)
    ),
    Case(
        "many-layer-refs-to-one-member",
        static(many_layer_refs),
        refused(r"lists 150000 layers, over 1000; refusing", "inspect {}", "verify {}"),
        isolated=True,
    ),
    Case(
        "layer-refs-at-the-limit",
        static(layer_refs_at_the_limit),
        refused(r"layer", "inspect {}", "verify {}"),
        isolated=True,
        seconds=5,
    ),
    Case(
        "oci-index-fan-out",
        static(index_fan_out),
        refused(r"more than 1000 manifests; refusing", "inspect {}"),
        isolated=True,
    ),
    Case(
        "oci-too-many-layers",
        static(oci_layers(1001)),
        refused(r"lists 1001 layers, over 1000", "inspect {}", "verify {}"),
    ),
    # 17. OCI layouts.
    Case(
        "oci-index-null",
        oci(index=b"null"),
        refused(r'index\.json has no "manifests" list'),
    ),
    Case(
        "oci-index-without-manifests",
        oci(index=b'{"schemaVersion": 2}'),
        refused(r'index\.json has no "manifests" list'),
    ),
    Case(
        "oci-archive-index-null",
        static(oci_tar(index=b"null")),
        refused(r'index\.json has no "manifests" list', *ALL),
    ),
    Case(
        "oci-md5-digest",
        static(bad_digest_descriptor("md5:d41d8cd98f00b204e9800998ecf8427e")),
        refused(r"unsupported or malformed digest 'md5:d41d8cd98f00b204e9800998ecf8427e'", *ALL),
    ),
    Case(
        "oci-digest-climbs",
        static(bad_digest_descriptor("sha256:../../../../etc/passwd")),
        refused(r"unsupported or malformed digest 'sha256:\.\./", *ALL),
    ),
    Case(
        "oci-dir-blob-is-symlink",
        blob_symlink,
        refused(r"'blobs/sha256/[0-9a-f]{64}' is not a regular file"),
    ),
    Case(
        "oci-dir-blobs-through-symlink",
        blobs_through_symlink,
        refused(r"'blobs/sha256/[0-9a-f]{64}' is reached through a symlink"),
    ),
    Case(
        "oci-dir-index-is-symlink",
        index_symlink,
        refused(r"index\.json 'index\.json' is not a regular file"),
    ),
    Case(
        "oci-dir-descriptor-size-mismatch",
        oci(manifest_descriptor={"size": 99}),
        (ok("inspect {}", SUMMARY), failed_check(DIGEST_MISMATCH.replace("(digest|size)", "size"))),
    ),
    Case(
        "oci-dir-blob-digest-mismatch",
        oci(wrong_manifest_bytes),
        (
            ok("inspect {}", SUMMARY),
            failed_check(DIGEST_MISMATCH.replace("(digest|size)", "digest")),
            failed_check(DIGEST_MISMATCH.replace("(digest|size)", "size")),
        ),
    ),
]


def _param(case: Case) -> object:
    return pytest.param(case, id=case.id)


def _snapshot(root: Path) -> set[str]:
    found = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


@functools.cache
def time_limit_factor() -> float:
    """How much longer than a case's `seconds` this machine may take (at least 1).

    The limits were set on machines that hash SHA-256 at 1 GB/s or more;
    a core without SHA extensions hashes at 0.2 to 0.33 GB/s, and refusing a
    bomb (hashing and inflating what it holds up to the limit) takes that
    much longer. The limits are there to catch hangs and runaway work, which
    cost many times more, on any machine.
    """
    data = bytes(32 << 20)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - start)
    # At most 10: a machine busy with other work must not stretch a hang's limit to minutes.
    return min(10.0, max(1.0, best / (len(data) / 1e9)))


def _check(outcome: Outcome, run: Run, case: Case) -> None:
    limit = case.seconds * time_limit_factor()
    where = (
        f"{run.command!r}: exit {outcome.code}\nstdout: {outcome.stdout}\nstderr: {outcome.stderr}"
    )
    assert not outcome.timed_out, f"{where}\ndid not finish in {limit:.1f}s"
    assert outcome.escaped is None, f"{where}\nexception escaped: {outcome.escaped!r}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, where
    assert outcome.code == run.code, where
    if run.code == 2:
        lines = outcome.stderr.splitlines()
        assert len(lines) == 1, f"{where}\nexpected exactly one line on stderr"
        assert lines[0].startswith("Error: "), where
        assert re.search(run.pattern, lines[0]), f"{where}\n{run.pattern!r} not in the error"
    else:  # stderr holds warnings at most (inspect's, of what does not add up)
        assert all(line.startswith("warning: ") for line in outcome.stderr.splitlines()), where
        assert re.search(run.pattern, outcome.stdout), f"{where}\n{run.pattern!r} not in stdout"
    assert outcome.seconds < limit, f"{where}\ntook {outcome.seconds:.1f}s, over {limit:.1f}s"
    if outcome.peak_rss_mb is not None:
        assert outcome.peak_rss_mb < case.max_rss_mb, (
            f"{where}\npeak RSS {outcome.peak_rss_mb:.0f} MB, over {case.max_rss_mb} MB"
        )


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile_archive(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_runner: CliRunner
) -> None:
    work = tmp_path / "work" / "deep"  # a '../../x' extracted from here would land in tmp_path
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    built = case.build(work)
    if isinstance(built, bytes):
        target = work / "hostile.tar"
        target.write_bytes(built)
    else:
        target = built
    good = tmp_path / "good.tar"
    good.write_bytes(docker_archive())
    for run in case.runs:
        args = [
            str(target) if word == "{}" else str(good) if word == "{good}" else word
            for word in run.command.split(" ")
        ]
        stdin = target.read_bytes() if "-" in args else None
        before = _snapshot(tmp_path)
        if case.isolated:
            outcome = run_isolated(args, stdin, work, case.seconds * time_limit_factor())
        else:
            outcome = run_in_process(cli_runner, args, stdin)
        _check(outcome, run, case)
        if not case.writes:
            assert _snapshot(tmp_path) == before, f"{run.command!r} created or removed files"
    assert not (tmp_path / "etc").exists()


def test_report_dir_keeps_climbing_entries_inside(tmp_path: Path, cli_runner: CliRunner) -> None:
    """diff-layers --report-dir writes '../../../escape' as report/{a,b}/escape, nowhere else."""
    work = tmp_path / "one" / "two" / "three"
    work.mkdir(parents=True)
    report_entry("../../../escape")(work)
    result = cli_runner.invoke(
        main,
        ["diff-layers", str(work / "a.tar"), str(work / "b.tar"), "--report-dir", str(work / "r")],
    )
    assert result.exit_code == 1, result.stderr
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("escape"))
    assert written == ["one/two/three/r/a/escape", "one/two/three/r/b/escape"]
    assert (work / "r" / "a" / "escape").read_bytes() == b"one"
    assert (work / "r" / "b" / "escape").read_bytes() == b"two!"


def test_the_corpus_is_large_and_builds_what_it_claims() -> None:
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)
    bomb = gzip_of_zeros(8 * MiB)
    assert zlib.decompress(bomb, 31) == bytes(8 * MiB)
    listing = many_members(3)
    with tarfile.open(fileobj=io.BytesIO(listing)) as archive:
        assert archive.getnames() == ["m0000000", "m0000001", "m0000002"]
    with tarfile.open(fileobj=io.BytesIO(docker_archive())) as archive:
        assert archive.getnames() == [
            LAYER_NAME,
            config_name(docker_entries()[1][1]),
            "manifest.json",
        ]
