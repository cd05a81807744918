"""The fixtures every test area shares: a private cache, stores, builds, podman, an image."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from guix_image.build.config import validate_config
from guix_image.build.engine import BuildResult, build_image
from guix_image.build.output import atomic_output
from guix_image.cli import main

from .support.cli import Cli
from .support.stores import BuildFn, StoreTree
from .support.tools import have, require


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


@pytest.fixture
def build(tmp_path: Path) -> BuildFn:
    """Build a config document to a file; returns (path, result). Keywords go to build_image."""
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


@pytest.fixture
def image(store: StoreTree, build: BuildFn) -> tuple[Path, BuildResult]:
    """An archive of ours with two layers: long names, a symlink, binary files."""
    app = store.item(
        "app",
        {
            "bin/app": "#!/bin/sh\n",
            "share/" + "n" * 150: "long name",
            "share/data": os.urandom(70_000),
        },
    )
    (app / "bin" / "link").symlink_to("app")
    lib = store.item("lib", {"lib/libx.so": os.urandom(200_000), "lib/empty": ""})
    return build(store.config([[lib], [app]], config={"Cmd": ["/bin/app"], "Env": ["A=1"]}))


@pytest.fixture
def image_file(store: StoreTree, build: BuildFn) -> Path:
    """A small archive of ours: one layer of one store item."""
    path, _ = build(store.config([[store.item("s", {"f": "1"})]]))
    return path


@pytest.fixture
def cli(cli_runner: CliRunner) -> Cli:
    """The command line in this process: `cli("inspect", path, input=bytes)`."""

    def invoke(*args: str, input: bytes | None = None) -> Result:
        return cli_runner.invoke(main, list(args), input=input)

    return invoke


@pytest.fixture
def podman_storage() -> Iterator[Path]:
    """A private podman storage (its runroot path must stay under 50 characters)."""
    require("podman")
    storage = Path(tempfile.mkdtemp(prefix="gi-podman-"))
    yield storage
    subprocess.run(["chmod", "-R", "u+w", str(storage)], capture_output=True)
    shutil.rmtree(storage, ignore_errors=True)


@pytest.fixture(scope="session")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Go's archive/tar and encoding/json, built from tests/support/oracle/oracle.go
    with the system's Go (offline: standard library only)."""
    require("go")
    work = tmp_path_factory.mktemp("go")
    binary = work / "oracle"
    environment = {**os.environ, "GOCACHE": str(work / "cache"), "HOME": str(work)}
    environment.update(GOPATH=str(work / "path"), GOFLAGS="", GO111MODULE="off")
    source = Path(__file__).parent / "support" / "oracle" / "oracle.go"
    built = subprocess.run(
        ["go", "build", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    return binary


# A real Nix store (Debian's nix-bin, as root, no daemon).

NIX_CONFIG = "sandbox = false\nbuild-users-group =\nsubstituters =\n"
NIX_CONFIG += "experimental-features = nix-command\n"
EXPRESSION = textwrap.dedent(
    """
    let
      sh = args: builtins.concatStringsSep "; " (["PATH=/bin:/usr/bin"] ++ args);
      dep = derivation {
        name = "guix-image-test-dep-@TOKEN@"; system = builtins.currentSystem;
        builder = "/bin/sh";
        args = ["-c" (sh ["mkdir -p $out/share" "echo dep > $out/share/data"])];
      };
    in derivation {
      name = "guix-image-test-app-@TOKEN@"; system = builtins.currentSystem;
      builder = "/bin/sh";
      args = ["-c" (sh [
        "mkdir -p $out/bin $out/share/deep/er"
        "printf '#!/bin/sh\\n' > $out/bin/run" "chmod 555 $out/bin/run"
        "ln -s run $out/bin/link" "echo ${dep} > $out/share/deep/er/ref"
        "echo plain > $out/share/plain"
      ])];
    }
    """
)


@pytest.fixture(scope="session")
def nix_items(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A store item with a file, an executable, a symlink and a nested directory,
    referring to another: built by nix-build into the real /nix/store."""
    if not have("nix-build") or os.geteuid() != 0:
        pytest.skip("nix-build is not installed, or not as root (.ci/run installs nix-bin)")
    directory = tmp_path_factory.mktemp("nix")
    token = os.urandom(4).hex()
    (directory / "image.nix").write_text(EXPRESSION.replace("@TOKEN@", token))
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    built = subprocess.run(
        ["nix-build", str(directory / "image.nix"), "--no-out-link"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    app = built.stdout.strip()
    closure = subprocess.run(
        ["nix-store", "-qR", app], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert len(closure) == 2
    return closure
