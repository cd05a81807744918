"""Real consumers of our archives: podman, skopeo, umoci, chroot and Docker.

Each test skips with the reason when its tool is missing; `.ci/run` installs
them all, so CI runs every one.
"""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from .support.archives import read_archive
from .support.stores import BuildFn, StoreTree, busybox_store, disk_tree, populate, rootfs_tree
from .support.tools import docker_answers, podman, run, to_oci, unpack


def test_podman_loads_the_image(store: StoreTree, build: BuildFn, podman_storage: Path) -> None:
    paths = populate(store)
    image, result = build(store.config([paths[:1], paths[1:]], repo_tag="guix-image-test/podman:1"))
    loaded = podman(podman_storage, "load", "-i", str(image))
    assert "Loaded image" in loaded.stdout + loaded.stderr
    inspected = json.loads(
        podman(podman_storage, "image", "inspect", "guix-image-test/podman:1").stdout
    )
    assert inspected[0]["RootFS"]["Layers"] == [layer.diff_id for layer in result.layers]


def test_skopeo_copies_it_checking_every_digest(
    store: StoreTree, build: BuildFn, tmp_path: Path
) -> None:
    paths = populate(store)
    image, result = build(store.config([paths[:1], paths[1:]]))
    layout = to_oci(tmp_path, image, "t")
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "t"
    inspected = json.loads(run("skopeo", "inspect", "--config", f"oci:{layout}:t").stdout)
    assert inspected["rootfs"]["diff_ids"] == [layer.diff_id for layer in result.layers]


def test_umoci_unpacks_exactly_the_store_paths(
    store: StoreTree, build: BuildFn, tmp_path: Path
) -> None:
    paths = populate(store)
    image, _ = build(store.config([paths[:1], paths[1:]]))
    rootfs = unpack(tmp_path, to_oci(tmp_path, image, "u"), "u")
    assert rootfs_tree(rootfs, paths) == disk_tree(paths)
    app = Path(str(rootfs) + str(paths[0]))
    assert (app / "bin" / "hardlink").stat().st_nlink == 1  # a separate regular file
    assert (app / "bin" / "hardlink").read_bytes() == (app / "bin" / "app").read_bytes()
    store_dir_in_image = Path(str(rootfs) + str(store.store_dir))
    assert stat.S_IMODE(store_dir_in_image.stat().st_mode) == 0o555


def test_the_image_runs_busybox_in_a_chroot(
    store: StoreTree, build: BuildFn, tmp_path: Path
) -> None:
    busybox = busybox_store(store)
    command = [str(busybox / "bin" / "busybox"), "echo", "hello"]
    image, _ = build(store.config([[busybox]], config={"Cmd": command}))
    rootfs = unpack(tmp_path, to_oci(tmp_path, image, "run"), "run")
    config = read_archive(image)["config"]["config"]
    result = run("chroot", str(rootfs), *config["Cmd"])
    assert result.stdout == "hello\n"


def test_base_image_a_under_image_b(
    store: StoreTree, build: BuildFn, tmp_path: Path, podman_storage: Path
) -> None:
    busybox = busybox_store(store)
    app = store.item("app", {"share/message": "from B\n"})
    base, _ = build(
        store.config([[busybox]], repo_tag="guix-image-test/a:1", config={"Env": ["A=1"]})
    )
    image, result = build(
        store.config(
            [[app]], from_image=str(base), repo_tag="guix-image-test/b:1", config={"Env": ["B=2"]}
        )
    )
    podman(podman_storage, "load", "-i", str(image))
    inspected = json.loads(
        podman(podman_storage, "image", "inspect", "guix-image-test/b:1").stdout
    )[0]
    assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in result.layers]
    assert inspected["Config"]["Env"] == ["A=1", "B=2"]
    rootfs = unpack(tmp_path, to_oci(tmp_path, image, "b"), "b")
    assert rootfs_tree(rootfs, [busybox, app]) == disk_tree([busybox, app])
    message = str(app / "share" / "message")
    result_run = run("chroot", str(rootfs), str(busybox / "bin" / "busybox"), "cat", message)
    assert result_run.stdout == "from B\n"


@pytest.fixture
def docker_tag() -> str:
    if not docker_answers():
        pytest.skip("no Docker daemon answers `docker info`")
    tag = f"guix-image-test/{uuid.uuid4().hex[:12]}:1"
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def test_docker_loads_and_runs_the_image(store: StoreTree, build: BuildFn, docker_tag: str) -> None:
    busybox = busybox_store(store)
    command = [str(busybox / "bin" / "busybox"), "echo", "hello from docker"]
    image, result = build(store.config([[busybox]], repo_tag=docker_tag, config={"Cmd": command}))
    run("docker", "load", "-i", str(image))
    diff_ids = json.loads(
        run("docker", "image", "inspect", docker_tag, "--format", "{{json .RootFS.Layers}}").stdout
    )
    assert diff_ids == [layer.diff_id for layer in result.layers]
    output = run("docker", "run", "--rm", "--network", "none", docker_tag)
    assert output.stdout == "hello from docker\n"
