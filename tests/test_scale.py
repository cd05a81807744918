"""Scale: a layer of 200,000 small files, and a file of 9 GiB (past the 8 GiB of a ustar
size field), each built, checked by skopeo (which verifies every digest) and by verify,
within the 100 MiB peak memory target; and the listing of an image of 2,000,000 entries
(the bound) within 256 MiB."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from .support.archives import END, archive_of_files, header, padded
from .support.stores import StoreTree, write_config
from .support.tools import require

ROOT = Path(__file__).resolve().parent.parent
# Runs guix-image and reports its peak RSS (VmHWM, read as it exits: ru_maxrss
# would carry pytest's over across exec). guix-image ends with os._exit.
MEASURED = """
import os, sys
report = sys.argv.pop(1)
leave = os._exit

def exit_with_peak(code):
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write([line.split()[1] for line in status if line.startswith("VmHWM:")][0])
    leave(code)

os._exit = exit_with_peak
from guix_image.__main__ import run
sys.argv[0] = "guix-image"
run()
"""


def guix_image_measured(*arguments: str, stdout: Path | None = None) -> int:
    """Run guix-image (its standard output to `stdout` if given); its peak RSS in MiB
    (it must succeed)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        with open(stdout or os.devnull, "wb") as out:
            result = subprocess.run(
                [sys.executable, "-c", MEASURED, str(report), *arguments],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                timeout=900,
            )
        assert result.returncode == 0, result.stderr
        return int(report.read_text()) // 1024


def needs_disk(directory: Path, gib: int) -> None:
    free = shutil.disk_usage(directory).free >> 30
    if free < gib:
        pytest.skip(f"needs {gib} GiB free under {directory}, has {free}")


def check_with_skopeo(archive: Path, directory: Path) -> None:
    """skopeo copies the archive, checking each layer against its digest."""
    require("skopeo")
    subprocess.run(
        ["skopeo", "copy", "-q", f"docker-archive:{archive}", f"dir:{directory}"],
        check=True,
        capture_output=True,
        timeout=900,
    )


def test_a_layer_of_200000_small_files(store: StoreTree, tmp_path: Path) -> None:
    top = store.item("many")
    for group in range(200):
        folder = top / f"d{group:03d}"
        folder.mkdir()
        for number in range(1000):
            (folder / f"f{number:03d}").write_bytes(b"%d" % number)
    config = write_config(tmp_path / "c.json", store.config([[top]]))
    archive = tmp_path / "many.tar"
    assert guix_image_measured("build", "-q", str(config), "-o", str(archive)) < 100
    assert guix_image_measured("verify", "-q", str(archive)) < 100
    check_with_skopeo(archive, tmp_path / "copied")


def test_a_file_of_9_gib(store: StoreTree, tmp_path: Path) -> None:
    needs_disk(tmp_path, 20)  # the archive and skopeo's copy of it
    top = store.item("big")
    with open(top / "blob", "wb") as blob:
        blob.truncate(9 << 30)  # sparse: no disk used for the source
    config = write_config(tmp_path / "c.json", store.config([[top]]))
    archive = tmp_path / "big.tar"
    try:
        peak = guix_image_measured("build", "-q", "--no-cache", str(config), "-o", str(archive))
        assert peak < 100
        assert archive.stat().st_size > 9 << 30
        assert guix_image_measured("verify", "-q", str(archive)) < 100
        check_with_skopeo(archive, tmp_path / "copied")
    finally:  # pytest keeps the last runs' directories: not 18 GiB of them
        archive.unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "copied", ignore_errors=True)


PACKAGES = 1999  # of 1,000 files each, and 1,000 entries in the upper layer: 2,000,000


def package(number: int) -> str:
    return f"nix/store/{number:032d}-package-{number}"


def write_layer(path: Path, entries: Iterable[tuple[str, int]]) -> str:
    """A gzipped layer of (name, size) files, written as it is made; its diff_id."""
    digest = hashlib.sha256()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
        batch = []
        for name, size in entries:
            batch.append(header(name, size=size) + padded(b"x" * size))
            if len(batch) == 10_000:
                data = b"".join(batch)
                digest.update(data)
                out.write(data)
                batch = []
        data = b"".join(batch) + END
        digest.update(data)
        out.write(data)
    return "sha256:" + digest.hexdigest()


def lower_entries() -> Iterator[tuple[str, int]]:
    for number in range(PACKAGES):
        size = 1 if number < 2 else 0  # package 0 is deleted, package 1's files hidden
        for file in range(1000):
            yield f"{package(number)}/share/doc/file-{file:04d}", size


def upper_entries() -> Iterator[tuple[str, int]]:
    yield f"nix/store/.wh.{package(0).rpartition('/')[2]}", 0
    yield f"{package(1)}/share/doc/.wh..wh..opq", 0
    for file in range(998):
        yield f"{package(1)}/share/doc/new-{file:04d}", 0


def test_the_listing_of_2_000_000_entries_streams_in_bounded_memory(tmp_path: Path) -> None:
    """`inspect --files --json` at the entry bound: the merged filesystem of a layer
    of 1,999,000 files and one that deletes a directory of 1,000 and hides another
    (opaque), listed within 256 MiB, as one JSON document."""
    needs_disk(tmp_path, 2)
    lower, upper = tmp_path / "lower.tar.gz", tmp_path / "upper.tar.gz"
    diff_ids = [write_layer(lower, lower_entries()), write_layer(upper, upper_entries())]
    archive = archive_of_files([lower, upper], diff_ids, tmp_path / "many.tar")
    listing = tmp_path / "listing.json"
    peak = guix_image_measured("inspect", "-q", str(archive), "--files", "--json", stdout=listing)
    assert peak < 256
    with open(listing) as text:
        head = list(itertools.takewhile(lambda line: line != '  "listing": [\n', text))
        paths = [line for line in text if line.startswith('      "path": ')]
    summary = json.loads("".join(head).rstrip(",\n") + "}")
    expected = PACKAGES * 1000 - 2000 + 998
    assert summary["files"] == len(paths) == expected
    assert summary["waste"]["bytes"] == 2000  # the 1-byte files deleted and hidden
    assert summary["waste"]["duplicated_files"] == 0
    survivors = set(paths)
    assert f'      "path": "{package(1)}/share/doc/new-0997",\n' in survivors
    assert f'      "path": "{package(1)}/share/doc/file-0000",\n' not in survivors
    assert not any(package(0) + "/" in line for line in paths)
    assert f'      "path": "{package(PACKAGES - 1)}/share/doc/file-0999",\n' in survivors
