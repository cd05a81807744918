"""Real tools and processes: guix-image itself, podman, docker, /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# guix-image in a process of its own, as users run it.
GUIX_IMAGE = [sys.executable, "-m", "guix_image"]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def require(tool: str) -> None:
    if not have(tool):
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")


def docker_answers() -> bool:
    if not have("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def is_root() -> bool:
    return os.geteuid() == 0


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a real tool; fail the test with its output if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


def podman(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(
        "podman",
        "--storage-driver",
        "vfs",
        "--root",
        str(storage / "root"),
        "--runroot",
        str(storage / "run"),
        *args,
    )


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, zombies included (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def convert(source: Path, form: str, directory: Path) -> str:
    """Our archive, rewritten by skopeo into `form`; returns what to pass to the readers."""
    require("skopeo")
    if form == "docker-archive":
        return str(source)
    flags = {
        "oci-gzip": ["--dest-compress-format", "gzip"],
        "oci-zstd": ["--dest-compress-format", "zstd"],
    }
    if form == "docker-archive-gzip":
        target, flags[form] = directory / "dgz.tar", ["--dest-compress"]
        destination = f"docker-archive:{target}:x/y:1"
    elif form == "oci-archive":
        target = directory / "oa.tar"
        destination = f"oci-archive:{target}:t"
    else:
        target = directory / form
        destination = f"oci:{target}:t"
    subprocess.run(
        ["skopeo", "copy", "-q", *flags.get(form, []), f"docker-archive:{source}", destination],
        check=True,
        capture_output=True,
    )
    return str(target)


def tampered_copy(archive: Path, form: str, tamper: str, directory: Path) -> Path:
    """Our archive in `form`, damaged (see archives.tamper_with), under `directory`."""
    from .archives import tamper_with

    directory.mkdir()
    if form == "docker-archive":
        target = directory / "image.tar"
        target.write_bytes(archive.read_bytes())
    else:
        target = Path(convert(archive, form, directory))
    tamper_with(target, tamper)
    return target


def to_oci(tmp_path: Path, image: Path, name: str) -> Path:
    require("skopeo")
    layout = tmp_path / f"oci-{name}"
    run("skopeo", "copy", f"docker-archive:{image}", f"oci:{layout}:{name}")
    return layout


def unpack(tmp_path: Path, layout: Path, name: str) -> Path:
    require("umoci")
    if not is_root():
        pytest.skip("umoci unpack keeps file owners only as root")
    bundle = tmp_path / f"bundle-{name}"
    run("umoci", "unpack", "--image", f"{layout}:{name}", str(bundle))
    return bundle / "rootfs"
