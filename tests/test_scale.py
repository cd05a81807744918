"""Scale: a layer of 200,000 small files, and a file of 9 GiB (past the 8 GiB of a ustar
size field), each built, checked by skopeo (which verifies every digest) and by verify,
within the 100 MiB peak memory target."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


def guix_image_measured(*arguments: str) -> int:
    """Run guix-image; its peak RSS in MiB (it must succeed)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        result = subprocess.run(
            [sys.executable, "-c", MEASURED, str(report), *arguments],
            capture_output=True,
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
