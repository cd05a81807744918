"""Shared fixtures: store trees in temporary directories, configs, builds, tools."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guix_image.build import BuildResult, build_image
from guix_image.config import validate_config
from guix_image.output import atomic_output

CREATED = "2024-01-02T03:04:05Z"


class StoreTree:
    """A throwaway store: `<tmp>/gnu/store/<hash>-<name>` items, made by the tests."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.store_dir = base / "gnu" / "store"
        self.store_dir.mkdir(parents=True)

    def path(self, name: str) -> Path:
        hash_part = hashlib.sha256(name.encode()).hexdigest()[:32]
        return self.store_dir / f"{hash_part}-{name}"

    def item(self, name: str, files: dict[str, str | bytes] | None = None) -> Path:
        """A directory store item holding `files` (relative path -> content)."""
        top = self.path(name)
        top.mkdir(parents=True, exist_ok=True)
        for relative, content in (files or {}).items():
            target = top / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            target.write_bytes(data)
        return top

    def config(self, layers: list[list[Path | str]], **fields: Any) -> dict[str, Any]:
        document: dict[str, Any] = {
            "architecture": "amd64",
            "config": {},
            "created": CREATED,
            "repo_tag": "test/image:latest",
            "store_dir": str(self.store_dir),
            "from_image": None,
            "store_layers": [[str(p) for p in layer] for layer in layers],
            "customisation_layer": None,
        }
        document.update(fields)
        return document


def settle() -> None:
    """Let a new store age past the clock tick of a scan, so that member lists are kept.

    Where timestamps have whole seconds (not on the ext4 and tmpfs the tests
    run on) the margin is 2 s, and the tests that count lists would fail.
    """
    from guix_image import member_list

    time.sleep(member_list.RACY_NS / 1e9 + 0.02)


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own layer cache, never the user's."""
    cache_home = tmp_path_factory.mktemp("cache-home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home / "guix-image"


@pytest.fixture
def store(tmp_path: Path) -> StoreTree:
    return StoreTree(tmp_path / "store-root")


BuildFn = Callable[..., tuple[Path, BuildResult]]


@pytest.fixture
def build(tmp_path: Path) -> BuildFn:
    """Build a config document to a file; returns (path, result)."""
    counter = iter(range(1_000_000))

    def run(
        document: dict[str, Any], name: str | None = None, **options: Any
    ) -> tuple[Path, BuildResult]:
        output = tmp_path / (name or f"image-{next(counter)}.tar")
        config = validate_config(document)
        with atomic_output(str(output)) as fd:
            result = build_image(config, fd, **options)
        return output, result

    return run


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


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


def read_archive(path: Path) -> dict[str, Any]:
    """manifest, config and layer member bytes of a Docker archive, via Python's tarfile."""
    with tarfile.open(path) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(outer.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
        layers = [outer.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]
    return {"manifest": manifest, "config": config, "layers": layers}


def layer_members(layer: bytes) -> list[tarfile.TarInfo]:
    import io

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return tar.getmembers()


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


@pytest.fixture
def podman_storage() -> Iterator[Path]:
    """A private podman storage (its runroot path must stay under 50 characters)."""
    require("podman")
    storage = Path(tempfile.mkdtemp(prefix="gi-podman-"))
    yield storage
    subprocess.run(["chmod", "-R", "u+w", str(storage)], capture_output=True)
    shutil.rmtree(storage, ignore_errors=True)


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
