"""inspect, verify and diff-layers on every archive form, cross-checked with real tools."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guix_image.cli import main

from .conftest import (
    BuildFn,
    StoreTree,
    docker_answers,
    layer_members,
    podman,
    read_archive,
    require,
)

FORMS = ["docker-archive", "oci", "oci-archive", "oci-gzip", "oci-zstd", "docker-archive-gzip"]


def cli(*args: str, input: bytes | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input)


def inspect_json(target: str | Path, *extra: str, input: bytes | None = None) -> dict[str, Any]:
    result = cli("inspect", str(target), "--json", *extra, input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def image(store: StoreTree, build: BuildFn) -> tuple[Path, Any]:
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


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_and_verifies_with_the_same_diff_ids(
    image: tuple[Path, Any], form: str, tmp_path: Path
) -> None:
    archive, result = image
    target = convert(archive, form, tmp_path)
    summary = inspect_json(target)
    expected = [layer.diff_id for layer in result.layers]
    assert [layer["diff_id"] for layer in summary["layers"]] == expected
    assert [layer["index"] for layer in summary["layers"]] == [1, 2]
    ours = inspect_json(archive)
    assert [layer["entries"] for layer in summary["layers"]] == [
        layer["entries"] for layer in ours["layers"]
    ]
    assert summary["config"]["Cmd"] == ["/bin/app"]
    compression = {"oci-zstd": "zstd", "oci-gzip": "gzip", "oci": "gzip", "oci-archive": "gzip"}
    assert {layer["compression"] for layer in summary["layers"]} == {compression.get(form, "none")}
    verified = cli("verify", target, "--json")
    assert verified.exit_code == 0, verified.stdout
    assert json.loads(verified.stdout)["ok"] is True
    # skopeo's own view of the same archive
    transport = {
        "docker-archive": "docker-archive",
        "docker-archive-gzip": "docker-archive",
        "oci-archive": "oci-archive",
    }
    reference = f"{transport.get(form, 'oci')}:{target}" + (
        "" if form.startswith("docker") else ":t"
    )
    config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", reference], capture_output=True, check=True
        ).stdout
    )
    assert config["rootfs"]["diff_ids"] == [layer["diff_id"] for layer in summary["layers"]]


@pytest.mark.parametrize("form", ["docker-archive", "oci-archive", "docker-archive-gzip"])
def test_standard_input_is_read_in_one_pass(
    image: tuple[Path, Any], form: str, tmp_path: Path
) -> None:
    archive, _ = image
    target = Path(convert(archive, form, tmp_path))
    data = target.read_bytes()
    from_stdin = inspect_json("-", input=data)
    from_file = inspect_json(target)
    assert from_stdin == from_file
    assert cli("verify", "-", input=data).exit_code == 0
    listing = inspect_json("-", "--files", "2", input=data)["listing"]
    assert any(
        entry["path"].endswith("/bin/link") and entry["linkname"] == "app" for entry in listing
    )


def flip_byte(data: bytearray, start: int, end: int) -> None:
    data[(start + end) // 2] ^= 0x40


@pytest.mark.parametrize("form", ["docker-archive", "oci-archive", "oci-zstd", "oci-gzip"])
@pytest.mark.parametrize("layer", [0, 1])
def test_verify_catches_a_flipped_byte_in_any_layer(
    image: tuple[Path, Any], form: str, layer: int, tmp_path: Path
) -> None:
    archive, _ = image
    target = Path(convert(archive, form, tmp_path))
    summary = inspect_json(target)
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


# Runs the command line with the size above which layers are read by two
# forked processes: 0 forks for any archive, a huge one never does.
FORKING = (
    "import sys; from guix_image import inspection; "
    "inspection.FORK_MIN_BYTES = int(sys.argv.pop(1)); "
    "from guix_image.cli import run; sys.argv[0] = 'guix-image'; run()"
)


def run_forking(fork_min_bytes: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", FORKING, str(fork_min_bytes), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_forked_readers_report_what_threads_do(image: tuple[Path, Any], tmp_path: Path) -> None:
    archive, _ = image
    for command in (["verify", "--json"], ["inspect", "--json"], ["inspect", "--files", "--json"]):
        forked, threaded = (run_forking(n, *command, str(archive)) for n in (0, 1 << 62))
        assert forked.returncode == threaded.returncode == 0, forked.stderr + threaded.stderr
        assert json.loads(forked.stdout) == json.loads(threaded.stdout)
    with tarfile.open(archive) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("/layer.tar"))
    data = bytearray(archive.read_bytes())
    flip_byte(data, member.offset_data + 1024, member.offset_data + member.size - 1024)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data)
    forked = run_forking(0, "verify", "--json", str(broken))
    assert forked.returncode == 1, forked.stderr
    failed = [check["name"] for check in json.loads(forked.stdout)["checks"] if not check["ok"]]
    assert failed == ["layer 1 diff_id"]


@pytest.mark.parametrize("form", ["docker-archive", "oci-archive"])
def test_podman_save_archives(image: tuple[Path, Any], form: str, podman_storage: Path) -> None:
    archive, result = image
    podman(podman_storage, "load", "-q", "-i", str(archive))
    saved = podman_storage / "saved.tar"
    podman(podman_storage, "save", "-q", "--format", form, "-o", str(saved), "test/image:latest")
    summary = inspect_json(saved)
    assert summary["repo_tags"] == ["localhost/test/image:latest"]
    assert [layer["diff_id"] for layer in summary["layers"]] == [
        layer.diff_id for layer in result.layers
    ]
    assert cli("verify", str(saved)).exit_code == 0


@pytest.mark.skipif(not docker_answers(), reason="no Docker daemon answers `docker info`")
def test_docker_save_archive(image: tuple[Path, Any], tmp_path: Path) -> None:
    archive, result = image
    tag = "guix-image-test/save:" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
    subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True)
    try:
        subprocess.run(["docker", "tag", "test/image:latest", tag], check=True, capture_output=True)
        saved = tmp_path / "saved.tar"
        subprocess.run(["docker", "save", "-o", str(saved), tag], check=True, capture_output=True)
        summary = inspect_json(saved)
        assert tag in summary["repo_tags"]
        assert [layer["diff_id"] for layer in summary["layers"]] == [
            layer.diff_id for layer in result.layers
        ]
        assert cli("verify", str(saved)).exit_code == 0
    finally:
        subprocess.run(["docker", "rmi", "-f", tag, "test/image:latest"], capture_output=True)


def docker25_archive(oci_dir: Path, target: Path) -> None:
    """What `docker save` writes since Docker 25: an OCI layout plus a manifest.json."""
    index = json.loads((oci_dir / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((oci_dir / "blobs" / "sha256" / manifest_digest).read_bytes())
    legacy = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"].split(":")[1],
            "RepoTags": ["docker25:latest"],
            "Layers": [
                "blobs/sha256/" + layer["digest"].split(":")[1] for layer in manifest["layers"]
            ],
        }
    ]
    (oci_dir / "manifest.json").write_text(json.dumps(legacy))
    with tarfile.open(target, "w") as tar:
        for path in sorted(oci_dir.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(oci_dir)), recursive=False)


def test_docker_25_archives(image: tuple[Path, Any], tmp_path: Path) -> None:
    archive, result = image
    layout = Path(convert(archive, "oci", tmp_path))
    target = tmp_path / "docker25.tar"
    docker25_archive(layout, target)
    summary = inspect_json(target)
    assert summary["format"] == "docker-archive (Docker 25+ OCI layout)"
    assert "docker25:latest" in summary["repo_tags"]
    assert [layer["diff_id"] for layer in summary["layers"]] == [
        layer.diff_id for layer in result.layers
    ]
    assert cli("verify", str(target)).exit_code == 0


def multi_image_archive(first: Path, second: Path, target: Path) -> None:
    members: dict[str, bytes] = {}
    manifest = []
    for prefix, source in (("a", first), ("b", second)):
        with tarfile.open(source) as tar:
            [entry] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            for name in [entry["Config"], *entry["Layers"]]:
                members[f"{prefix}/{name}"] = tar.extractfile(name).read()  # type: ignore[union-attr]
            manifest.append(
                {
                    "Config": f"{prefix}/{entry['Config']}",
                    "RepoTags": [f"multi-{prefix}:1"],
                    "Layers": [f"{prefix}/{name}" for name in entry["Layers"]],
                }
            )
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_archives_with_several_images(store: StoreTree, build: BuildFn, tmp_path: Path) -> None:
    one, _ = build(store.config([[store.item("one", {"f": "1"})]]))
    two, _ = build(
        store.config([[store.item("two", {"f": "2"})], [store.item("three", {"g": "3"})]])
    )
    multi = tmp_path / "multi.tar"
    multi_image_archive(one, two, multi)
    ambiguous = cli("inspect", str(multi))
    assert ambiguous.exit_code == 2
    assert "holds 2 images; choose one with --image: 1 (multi-a:1" in ambiguous.stderr
    assert len(inspect_json(multi, "--image", "2")["layers"]) == 2
    assert len(inspect_json(multi, "--image", "multi-a:1")["layers"]) == 1
    assert len(inspect_json(multi, "--image", "multi-b")["layers"]) == 2
    missing = cli("inspect", str(multi), "--image", "3")
    assert missing.exit_code == 2 and "there is no image 3" in missing.stderr


def test_inspect_json_is_documented_and_complete(image: tuple[Path, Any]) -> None:
    archive, result = image
    summary = inspect_json(archive)
    for key in (
        "format",
        "repo_tags",
        "config_digest",
        "architecture",
        "os",
        "created",
        "config",
        "layers",
        "total_size",
    ):
        assert key in summary
    assert summary["config_digest"] == result.image_id
    assert summary["total_size"] == sum(layer["size"] for layer in summary["layers"])
    for layer in summary["layers"]:
        assert set(layer) >= {"index", "diff_id", "size", "entries", "comment"}
        assert layer["comment"].startswith("store paths: ")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for key in summary:
        assert f"`{key}`" in readme, f"README.md does not document inspect --json's {key!r}"


def layer_tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def archive_of(
    layers: list[bytes], target: Path, *, stored: list[bytes] | None = None, **config: Any
) -> Path:
    """A Docker archive of layer tars; `stored` are the blobs as written (compressed, say)."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    document = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        **config,
    }
    config_bytes = json.dumps(document).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    members = {f"{i}/layer.tar": layer for i, layer in enumerate(stored or layers)}
    members[config_name] = config_bytes
    members["manifest.json"] = json.dumps(
        [
            {
                "Config": config_name,
                "RepoTags": ["crafted:1"],
                "Layers": [f"{i}/layer.tar" for i in range(len(layers))],
            }
        ]
    ).encode()
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def test_waste_whiteouts_and_the_merged_filesystem(tmp_path: Path) -> None:
    big = b"x" * 100_000
    lower = layer_tar(
        [
            ("etc", None),
            ("etc/big", big),
            ("etc/gone", b"g" * 5000),
            ("opt", None),
            ("opt/a", b"a" * 700),
        ]
    )
    upper = layer_tar(
        [
            ("etc", None),
            ("etc/big", b"small"),
            ("etc/.wh.gone", b""),
            ("opt", None),
            ("opt/.wh..wh..opq", b""),
            ("opt/b", b"b"),
        ]
    )
    archive = archive_of([lower, upper], tmp_path / "waste.tar")
    summary = inspect_json(archive)
    assert summary["waste"]["bytes"] == 100_000 + 5000 + 700
    assert summary["waste"]["largest"][0] == {"path": "etc/big", "bytes": 100_000, "layers": [1, 2]}
    assert summary["waste"]["duplicated_files"] == 1
    merged = {entry["path"]: entry for entry in inspect_json(archive, "--files")["listing"]}
    assert set(merged) == {"etc", "etc/big", "opt", "opt/b"}
    assert merged["etc/big"]["layer"] == 2 and merged["etc/big"]["size"] == 5
    tree = cli("inspect", str(archive), "--files", "--tree")
    assert tree.exit_code == 0
    assert "big  (5 B, layer 2)" in tree.stdout


def test_diff_layers_finds_what_changed(store: StoreTree, build: BuildFn, tmp_path: Path) -> None:
    item = store.item("d", {"bin/tool": "v1", "share/same": "s", "share/old": "o"})
    a, _ = build(store.config([[store.item("base", {"x": "1"})], [item]], config={"Env": ["V=1"]}))
    (item / "bin" / "tool").write_text("v2!")
    (item / "share" / "old").unlink()
    (item / "share" / "new").write_text("n")
    b, _ = build(
        store.config(
            [[store.item("base", {"x": "1"})], [item]],
            config={"Env": ["V=2"]},
            mtime="2030-01-01T00:00:00Z",
        )
    )
    result = cli("diff-layers", str(a), str(b), "--json", "--report-dir", str(tmp_path / "report"))
    assert result.exit_code == 1, result.stderr
    diff = json.loads(result.stdout)
    assert diff["identical"] is False
    assert (
        len(diff["layers"]["only_a"]) == 2 and len(diff["layers"]["shared"]) == 0
    )  # mtime changed both
    prefix = str(item).lstrip("/") + "/"
    changes = {c["path"][len(prefix) :]: c for c in diff["files"] if c["path"].startswith(prefix)}
    assert changes["share/new"]["change"] == "added"
    assert changes["share/old"]["change"] == "removed"
    assert {f["field"] for f in changes["bin/tool"]["fields"]} == {"size", "mtime", "sha256"}
    assert "share/same" in changes  # its mtime changed
    assert {"field": "config.Env", "a": ["V=1"], "b": ["V=2"]} in diff["config"]
    full = prefix + "bin/tool"
    assert (tmp_path / "report" / "a" / full).read_text() == "v1"
    assert (tmp_path / "report" / "b" / full).read_text() == "v2!"
    ignoring = json.loads(
        cli("diff-layers", str(a), str(b), "--json", "--ignore-timestamps").stdout
    )
    assert {
        f["field"] for f in next(c for c in ignoring["files"] if c["path"] == full)["fields"]
    } == {"size", "sha256"}
    assert not any(c["path"].endswith("/x") for c in ignoring["files"])  # only its mtime differed


def test_diff_layers_identical_and_semantic(
    store: StoreTree, build: BuildFn, tmp_path: Path
) -> None:
    item = store.item("i", {"f": "1"})
    a, _ = build(store.config([[item]]))
    same = cli("diff-layers", str(a), str(a))
    assert same.exit_code == 0 and "Identical." in same.stdout
    b, _ = build(
        store.config([[item]], mtime="2030-01-01T00:00:00Z", created="2030-01-01T00:00:00Z")
    )
    assert cli("diff-layers", str(a), str(b)).exit_code == 1
    assert cli("diff-layers", str(a), str(b), "--ignore-timestamps").exit_code == 0
    assert cli("diff-layers", "-", "-").exit_code == 2


def test_verify_rebuild_reproduces_and_names_what_changed(
    store: StoreTree, build: BuildFn, tmp_path: Path
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


def test_verify_against_another_archive(store: StoreTree, build: BuildFn) -> None:
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


def test_build_from_a_compressed_oci_base(store: StoreTree, build: BuildFn, tmp_path: Path) -> None:
    base, base_result = build(
        store.config([[store.item("base", {"etc/os": "x" * 10_000})]], repo_tag="b:1")
    )
    oci_base = convert(base, "oci-archive", tmp_path)
    image, _ = build(store.config([[store.item("top", {"t": "t"})]], from_image=oci_base))
    archive = read_archive(image)
    assert archive["config"]["rootfs"]["diff_ids"][0] == base_result.layers[0].diff_id
    assert layer_members(archive["layers"][0])[-1].name.endswith("etc/os")
    assert cli("verify", str(image)).exit_code == 0
