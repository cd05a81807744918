"""Faults during a build, made for real: files changing under it, a full disk, signals at
any moment, SIGKILL, builds at once. Every time: a non-zero exit with one line, no
output file, no temporary file, no stale cache entry, never an archive whose digests
do not match its bytes; and the next build gives the bytes a calm build gives.
"""

from __future__ import annotations

import fcntl
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from guix_image.build.config import validate_config
from guix_image.build.engine import build_image
from guix_image.build.output import atomic_output, remove_dead_parts
from guix_image.errors import OperationError

from .support.stores import StoreTree, settle, write_config
from .support.tools import GUIX_IMAGE


class ChangeAfterTheScan:
    """A progress reporter that does `change` once the layer is sized, before its copy."""

    def __init__(self, change: Any) -> None:
        self.change = change

    def layer_started(self, number: int, total: int, description: str) -> None:
        pass

    def layer_sized(self, size: int) -> None:
        self.change()

    def layer_progress(self, written: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def replace_with_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to("/etc/passwd")


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda path: path.unlink(), "No such file"),
        (replace_with_symlink, "symbolic links"),
        (replace_with_fifo, "no longer a regular file|shrank"),
        (lambda path: path.write_bytes(b"x" * 20_000), "grew"),
    ],
    ids=["vanishes", "symlink", "fifo", "grows"],
)
def test_a_file_that_changes_under_the_build_fails_it_and_leaves_nothing(
    change: Any, message: str, store: StoreTree, tmp_path: Path
) -> None:
    item = store.item("x", {"f": "original", "g": "other"})
    output = tmp_path / "out" / "image.tar"
    output.parent.mkdir()
    config = validate_config(store.config([[item]]))
    with pytest.raises(OperationError, match=message):  # noqa: SIM117
        with atomic_output(str(output)) as fd:
            build_image(config, fd, progress=ChangeAfterTheScan(lambda: change(item / "f")))
    assert list(output.parent.iterdir()) == []


def build_process(config: Path, output: Path, **options: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*GUIX_IMAGE, "build", "-q", str(config), "-o", str(output)],
        stderr=subprocess.PIPE,
        **options,
    )


def test_a_full_disk_fails_with_one_line_and_leaves_nothing(
    store: StoreTree, tmp_path: Path
) -> None:
    item = store.item("big", {"f": os.urandom(400_000)})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    out = tmp_path / "out"
    out.mkdir()
    limit = 100_000  # bytes any file may grow to: RLIMIT_FSIZE, as a full disk does

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = build_process(config, out / "image.tar", preexec_fn=small_disk)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.decode() == "Error: cannot write the output: File too large\n"
    assert list(out.iterdir()) == []
    # The cache is not left stale: the next build succeeds and gives the calm bytes.
    calm = build_process(config, out / "image.tar")
    assert calm.wait(timeout=120) == 0
    fresh = subprocess.run(
        [*GUIX_IMAGE, "build", "-q", "--no-cache", str(config), "-o", str(tmp_path / "f.tar")]
    )
    assert fresh.returncode == 0
    assert (out / "image.tar").read_bytes() == (tmp_path / "f.tar").read_bytes()


def test_a_killed_builds_temporary_file_goes_with_the_next_build(
    store: StoreTree, tmp_path: Path
) -> None:
    item = store.item("big")
    with open(item / "blob", "wb") as f:
        f.truncate(1 << 30)  # sparse: slow enough to kill mid-way
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    out = tmp_path / "out"
    out.mkdir()
    process = build_process(config, out / "image.tar")
    deadline = time.monotonic() + 60
    while not [p for p in out.iterdir() if p.name.endswith(".part") and p.stat().st_size]:
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.01)
    process.kill()
    process.wait()
    [left] = list(out.iterdir())
    assert left.name.startswith(".image.tar.") and left.name.endswith(".part")
    small = store.item("small", {"f": "1"})
    write_config(tmp_path / "c.json", store.config([[small]]))
    assert build_process(config, out / "image.tar").wait(timeout=120) == 0
    assert [p.name for p in out.iterdir()] == ["image.tar"]


def test_a_temporary_file_still_being_written_is_left_alone(tmp_path: Path) -> None:
    live = tmp_path / ".image.tar.abc123.part"
    dead = tmp_path / ".image.tar.def456.part"
    for path in (live, dead):
        path.write_bytes(b"partial")
    with live.open("rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # what a live build holds
        assert remove_dead_parts(str(tmp_path), ".image.tar.") == [dead.name]
    assert live.exists() and not dead.exists()


def with_reference(
    store: StoreTree, tmp_path: Path, layers: int, files: int, size: int
) -> tuple[Path, Path]:
    """A config of `layers` store items of `files` random files each, and the archive a
    calm build without the cache makes of it."""
    items = [
        store.item(f"i{n}", {f"f{k}": os.urandom(size) for k in range(files)})
        for n in range(layers)
    ]
    settle()
    config = write_config(tmp_path / "c.json", store.config([[item] for item in items]))
    reference = tmp_path / "reference.tar"
    calm = [*GUIX_IMAGE, "build", "-q", "--no-cache", str(config), "-o", str(reference)]
    assert subprocess.run(calm).returncode == 0
    return config, reference


def test_signals_at_any_moment_leave_a_whole_archive_or_nothing(
    store: StoreTree, tmp_path: Path
) -> None:
    config, reference = with_reference(store, tmp_path, layers=4, files=40, size=50_000)
    out = tmp_path / "out"
    out.mkdir()
    rng = random.Random(14)
    for round_ in range(12):
        output = out / "image.tar"
        if output.exists():
            output.unlink()
        process = build_process(config, output)
        time.sleep(rng.uniform(0, 0.6))
        signum = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert b"Traceback" not in stderr, (round_, stderr)
        if process.returncode == 0:  # it finished first
            assert output.read_bytes() == reference.read_bytes()
        else:
            assert process.returncode in (130, 128 + signum, -signum), (round_, stderr)
            assert not output.exists()
        assert [p.name for p in out.iterdir() if p.name.endswith(".part")] == []
    # What the interrupted builds left in the cache is sound.
    assert build_process(config, out / "final.tar").wait(timeout=120) == 0
    assert (out / "final.tar").read_bytes() == reference.read_bytes()


def test_four_builds_at_once_share_one_cache(store: StoreTree, tmp_path: Path) -> None:
    config, reference = with_reference(store, tmp_path, layers=3, files=30, size=30_000)
    for rounds in range(2):  # cold, then warm
        processes = [build_process(config, tmp_path / f"{rounds}-{n}.tar") for n in range(4)]
        for process in processes:
            _, stderr = process.communicate(timeout=180)
            assert process.returncode == 0, stderr
        for n in range(4):
            assert (tmp_path / f"{rounds}-{n}.tar").read_bytes() == reference.read_bytes()
