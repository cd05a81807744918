"""`verify`: an archive's digests against its bytes, in every form, and against a
rebuild or another archive."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from guix_image.build.engine import BuildResult

from .support.archives import (
    TAMPERED,
    archive_of,
    descriptor,
    flip_byte,
    image_config,
    layer_tar,
    oci_files,
    sha256,
    tamper_with,
    write_layout,
)
from .support.cli import Cli, inspect_json
from .support.stores import BuildFn, StoreTree
from .support.tools import convert, docker_answers, podman, require, tampered_copy


@pytest.mark.parametrize("form", ["docker-archive", "oci-archive", "oci-zstd", "oci-gzip"])
@pytest.mark.parametrize("layer", [0, 1])
def test_verify_catches_a_flipped_byte_in_any_layer(
    image: tuple[Path, BuildResult], form: str, layer: int, tmp_path: Path, cli: Cli
) -> None:
    archive, _ = image
    target = Path(convert(archive, form, tmp_path))
    summary = inspect_json(cli, target)
    if target.is_dir():
        blob = target / "blobs" / "sha256" / summary["layers"][layer]["digest"].split(":")[1]
        data = bytearray(blob.read_bytes())
        flip_byte(data, 0, len(data))
        blob.write_bytes(data)
    else:
        with tarfile.open(target) as outer:
            names = [
                m
                for m in outer.getmembers()
                if m.size == summary["layers"][layer]["size"] and m.isfile()
            ]
            member = next(
                m
                for m in names
                if summary["layers"][layer]["diff_id"].split(":")[1] in m.name or True
            )
        data = bytearray(target.read_bytes())
        flip_byte(data, member.offset_data + 1024, member.offset_data + member.size - 1024)
        target.write_bytes(data)
    result = cli("verify", str(target), "--json")
    assert result.exit_code == 1, result.output
    failed = [check for check in json.loads(result.stdout)["checks"] if not check["ok"]]
    assert failed and all(check["name"].startswith(f"layer {layer + 1}") for check in failed)


def test_verify_rebuild_reproduces_and_names_what_changed(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
    item = store.item("r", {"bin/r": "one"})
    document = store.config([[store.item("base", {"x": "1"})], [item]])
    archive, _ = build(document)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(document))
    ok = cli("verify", str(archive), "--rebuild", str(config), "--json")
    assert ok.exit_code == 0, ok.stdout
    assert any(c["name"] == "rebuild layer 2" and c["ok"] for c in json.loads(ok.stdout)["checks"])
    (item / "bin" / "r").write_text("two")
    changed = cli("verify", str(archive), "--rebuild", str(config), "--json")
    assert changed.exit_code == 1
    report = json.loads(changed.stdout)
    assert report["mismatch"]["layer"] == 2
    assert [c["path"].rsplit("/", 1)[-1] for c in report["mismatch"]["files"]] == ["r"]


def test_verify_against_another_archive(store: StoreTree, build: BuildFn, cli: Cli) -> None:
    item = store.item("v", {"f": "1"})
    a, _ = build(store.config([[item]]))
    b, _ = build(store.config([[item]]))
    assert cli("verify", str(a), "--against", str(b)).exit_code == 0
    (item / "f").write_text("2")
    c, _ = build(store.config([[item]]))
    result = cli("verify", str(a), "--against", str(c))
    assert result.exit_code == 1
    assert "FAIL  against layer 1" in result.stdout
    assert "First differing layer: 1" in result.stdout


def test_a_blob_bigger_than_its_descriptor_says_is_not_hashed(tmp_path: Path, cli: Cli) -> None:
    """A terabyte of holes behind a descriptor of 2,048 bytes fails at once."""
    import time

    layout = write_layout(tmp_path / "layout", oci_files())
    blob = layout / the_layer(layout)
    with blob.open("r+b") as file:
        file.truncate(1 << 40)  # sparse: no disk used
    started = time.monotonic()
    result = cli("verify", str(layout), "--json")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1, result.output
    failed = {
        check["name"]: check for check in json.loads(result.stdout)["checks"] if not check["ok"]
    }
    assert "layer 1 blob size" in failed
    assert "not read" in failed["layer 1 readable"]["actual"]


def the_layer(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    manifest_path = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / manifest_path).read_text())
    return "blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]


def hard_link_layer(forward: bool) -> bytes:
    """A layer holding `link`, a hard link to `target`, after or before it."""
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        target = tarfile.TarInfo("target")
        target.size = 4
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.LNKTYPE, "target"
        members = (
            [(link, None), (target, b"data")] if forward else [(target, b"data"), (link, None)]
        )
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


@pytest.mark.parametrize("forward", [True, False], ids=["to-a-later-entry", "to-an-earlier-one"])
def test_a_hard_link_docker_cannot_extract_fails(forward: bool, tmp_path: Path, cli: Cli) -> None:
    archive = archive_of([hard_link_layer(forward)], tmp_path / "links.tar")
    result = cli("verify", str(archive), "--json")
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["layer 1 hard links to earlier entries"]["ok"] is not forward
    assert result.exit_code == (1 if forward else 0)
    if docker_answers():  # what the loader says, where it can be asked
        loaded = subprocess.run(["docker", "load", "-i", str(archive)], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", "crafted:1"], capture_output=True)
        assert (loaded.returncode == 0) is not forward, loaded.stderr


def docker_filesystem(archive: Path, tmp_path: Path) -> set[str]:
    """The paths of the filesystem docker makes of the image (via docker export)."""
    loaded = subprocess.run(
        ["docker", "load", "-i", str(archive)], capture_output=True, text=True, check=True
    )
    image = loaded.stdout.strip().rsplit(" ", 1)[-1]
    container = subprocess.run(
        ["docker", "create", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        exported = tmp_path / "exported.tar"
        subprocess.run(["docker", "export", "-o", str(exported), container], check=True)
        with tarfile.open(exported) as tar:
            return {member.name.rstrip("/") for member in tar.getmembers()}
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)


def podman_filesystem(archive: Path, storage: Path) -> set[str]:
    """The paths of the filesystem podman's vfs driver makes of the image."""
    loaded = podman(storage, "load", "-q", "-i", str(archive)).stdout.strip()
    image = loaded.rsplit(" ", 1)[-1]
    mounted = Path(podman(storage, "image", "mount", image).stdout.strip())
    try:
        return {path.relative_to(mounted).as_posix() for path in mounted.rglob("*")}
    finally:
        podman(storage, "image", "umount", image)


def test_layers_loaders_apply_differently_fail(
    tmp_path: Path, podman_storage: Path, cli: Cli
) -> None:
    """An opaque whiteout after an entry of its own layer: podman's vfs driver (which
    extracts layers in place) deletes the entry, docker on overlayfs keeps it. No
    verdict on what such an image holds can stand: verify fails, naming the entry.
    The whiteout before the layer's entries (as docker writes it) passes."""
    require("podman")
    lower = layer_tar([("o", None), ("o/x", None), ("o/x/old", b"1")])
    contested = layer_tar([("o/x/new", b"2"), ("o/.wh..wh..opq", b""), ("o/y", b"3")])
    archive = archive_of([lower, contested], tmp_path / "contested.tar", config={"Cmd": ["/y"]})
    result = cli("verify", str(archive), "--json")
    assert result.exit_code == 1, result.output
    [check] = [c for c in json.loads(result.stdout)["checks"] if not c["ok"]]
    assert check["name"] == "layers every loader applies alike"
    assert check["actual"] == "they differ at 1: o/x/new"
    listed = {entry["path"] for entry in inspect_json(cli, archive, "--files")["listing"]}
    assert listed == {"o", "o/x/new", "o/y"}  # as overlayfs has it
    assert podman_filesystem(archive, podman_storage) == {"o", "o/y"}
    if docker_answers():
        assert {"o/x/new", "o/y"} <= docker_filesystem(archive, tmp_path)
    ordered = layer_tar([("o/.wh..wh..opq", b""), ("o/x/new", b"2"), ("o/y", b"3")])
    fine = archive_of([lower, ordered], tmp_path / "ordered.tar")
    result = cli("verify", str(fine), "--json")
    assert result.exit_code == 0, result.output
    names = [c["name"] for c in json.loads(result.stdout)["checks"]]
    assert "layers every loader applies alike" in names


def test_the_other_archive_is_checked_by_its_bytes_too(tmp_path: Path, cli: Cli) -> None:
    """`verify A --against B` where B claims A's digests but one of its bytes is
    flipped: B's own checks fail (it used to pass on B's claims)."""
    layer = layer_tar([("d", None), ("d/big", b"x" * 100_000)])
    good = archive_of([layer], tmp_path / "a.tar")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes())
    tamper_with(bad, "flipped-byte")
    result = cli("verify", str(good), "--against", str(bad), "--json")
    assert result.exit_code == 1, result.output
    failed = [check["name"] for check in json.loads(result.stdout)["checks"] if not check["ok"]]
    assert failed == ["other archive layer 1 diff_id"]


def test_an_unreadable_archive_is_a_failed_check_in_json(tmp_path: Path, cli: Cli) -> None:
    """A truncated download: `verify --json | jq .ok` says false (it printed nothing)."""
    layer = layer_tar([("d", None), ("d/big", b"x" * 100_000)])
    good = archive_of([layer], tmp_path / "a.tar")
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(good.read_bytes()[:60_000])
    result = cli("verify", str(truncated), "--json")
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)
    assert verdict["ok"] is False
    [check] = verdict["checks"]
    assert check["name"] == "archive readable" and "truncated" in check["actual"]
    missing = cli("verify", str(tmp_path / "nowhere.tar"), "--json")
    assert missing.exit_code == 2  # not an archive at all: trouble, said in JSON too
    assert json.loads(missing.stdout) == {
        "error": f"{tmp_path / 'nowhere.tar'}: no such file or directory",
        "exit_code": 2,
    }


def test_a_media_type_that_names_another_compression_fails(tmp_path: Path, cli: Cli) -> None:
    """`+gzip` over uncompressed bytes (skopeo 1.9 with
    --dest-oci-accept-uncompressed-layers writes it; umoci refuses it): a FAIL in
    verify, a warning from inspect."""
    layer = layer_tar([("f", b"1")])
    config = image_config([sha256(layer)])
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [descriptor(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        }
    ).encode()
    layout = write_layout(tmp_path / "layout", oci_files([layer], config=config, manifest=manifest))
    result = cli("verify", str(layout), "--json")
    assert result.exit_code == 1
    [failed] = [c for c in json.loads(result.stdout)["checks"] if not c["ok"]]
    assert (failed["name"], failed["expected"], failed["actual"]) == (
        "layer 1 compression",
        "gzip",
        "none",
    )
    shown = cli("inspect", str(layout))
    assert shown.exit_code == 0
    assert "warning: layer 1: its media type application/vnd.oci.image.layer.v1.tar+gzip " in (
        shown.stderr
    )
    fine = write_layout(tmp_path / "fine", oci_files([layer], config=config))
    assert cli("verify", str(fine)).exit_code == 0
    assert "warning" not in cli("inspect", str(fine)).stderr


def test_inspect_warns_of_what_does_not_add_up(tmp_path: Path, cli: Cli) -> None:
    """A config whose diff_ids outnumber the manifest's layers: inspect says so."""
    layer = layer_tar([("f", b"1")])
    archive = archive_of(
        [layer], tmp_path / "a.tar", rootfs={"type": "layers", "diff_ids": [sha256(layer)] * 2}
    )
    shown = cli("inspect", str(archive))
    assert shown.exit_code == 0
    assert "warning: layer count: expected 2, found 1" in shown.stderr


@pytest.mark.parametrize(("form", "tamper"), TAMPERED)
def test_verify_fails_every_tampered_archive(
    image: tuple[Path, BuildResult], form: str, tamper: str, tmp_path: Path, cli: Cli
) -> None:
    """The tamper matrix for verify, alone and as the other side of --against: a
    FAIL (exit 1, `"ok": false`), whatever the form and the damage."""
    archive, _ = image
    bad = tampered_copy(archive, form, tamper, tmp_path / "bad")
    for arguments in ([str(bad)], [str(archive), "--against", str(bad)]):
        result = cli("verify", *arguments, "--json")
        assert result.exit_code == 1, result.output
        assert json.loads(result.stdout)["ok"] is False
