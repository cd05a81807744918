"""Golden digests: the exact bytes `build` writes, pinned.

Recorded before the package was restructured (issue 13) and unchanged by
it. A digest here changes only when the output format changes on purpose;
then CHANGELOG.md says so (and the cache's LAYER_FORMAT is bumped).

Every store is built under `--root` with store_dir /gnu/store, so the
archives do not depend on where the test runs, nor on the umask, nor on the
user or the time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from guix_image.cli import main

STORE = "/gnu/store"
# sha256 of each archive, as the code before the restructuring wrote it.
GOLDEN = {
    # Since issue 16 the example holds a program (no shell needed), one per architecture.
    "example": "0d4e75a1e479fa952d9427cc11f848f29a2439f437da428da96b6375e156787e",
    "example arm64": "6ac69a68f898264b00513101ec38835176fdebf90e737b1810e89826ee9cafad",
    "store": "19ced223c5e037ae12eecba2590bc195d63663b01873007fac029685751870ed",
    "base": "98df30a9f396886a75a20ff35dc8c9eacb94ad5815ca8904c11fc73349256da9",
    "on base": "3ba3b7094404af956c5d9b27870b6cca490ff1f7fa8525ff5d2b11a83be44d60",
}
CREATED = "2024-01-02T03:04:05Z"


def item_path(name: str) -> str:
    return f"{STORE}/{hashlib.sha256(name.encode()).hexdigest()[:32]}-{name}"


def write(root: Path, path: str | bytes, content: bytes, mode: int = 0o444) -> None:
    full = os.fsencode(root) + os.fsencode(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(content)
    os.chmod(full, mode)


def fix_directory_modes(root: Path) -> None:
    for directory, subdirectories, _ in os.walk(root / "gnu"):
        for name in subdirectories:
            os.chmod(os.path.join(directory, name), 0o555)
        os.chmod(directory, 0o555)


def make_store(root: Path) -> dict[str, str]:
    """Store items with every kind of entry the issue names; their paths by role."""
    app = item_path("app-1.0")
    write(root, f"{app}/bin/app", b"#!/bin/sh\necho app\n", 0o555)
    write(root, f"{app}/share/empty", b"")
    disk = os.fsencode(root) + app.encode()
    os.link(disk + b"/bin/app", disk + b"/bin/hard")
    write(root, f"{app}/share/{'long-' * 30}name.txt", b"over 100 bytes of path")
    deep = "/".join(f"d{i}" for i in range(40))
    write(root, f"{app}/share/deep/{deep}/leaf", b"deep")
    write(root, f"{app}/share/{'x' * 200}/{'y' * 100}", b"over 255 bytes of path")
    write(root, f"{app}/share/caf\u00e9-\u65e5\u672c.txt", b"utf-8 name")
    write(root, f"{app}/share/raw-".encode() + b"\xff\xfe", b"non-UTF-8 name", 0o644)
    os.symlink("app", disk + b"/bin/relative")
    os.symlink("/gnu/store/" + "t" * 120, disk + b"/bin/long-target")
    os.makedirs(disk + b"/share/empty-dir")
    data = item_path("data.json")
    write(root, data, b'{"a": 1}')
    big = item_path("big")
    write(root, f"{big}/blob", bytes(range(256)) * 40_000, 0o644)  # 10 MB: several blocks
    fix_directory_modes(root)
    return {"app": app, "data": data, "big": big}


def config(store: dict[str, str], **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "architecture": "amd64",
        "created": CREATED,
        "repo_tag": "golden:1",
        "store_dir": STORE,
        "store_layers": [[store["app"]], [store["data"], store["big"]]],
        "config": {"Cmd": ["/bin/app"], "Env": ["PATH=/bin"]},
    }
    document.update(fields)
    return document


def run_build(cli_runner: Any, tmp_path: Path, document: dict[str, Any], root: Path) -> bytes:
    config_file = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    config_file.write_text(json.dumps(document))
    output = tmp_path / (config_file.stem + ".tar")
    result = cli_runner.invoke(
        main,
        ["build", "-q", "--no-cache", str(config_file), "--root", str(root), "-o", str(output)],
    )
    assert result.exit_code == 0, result.output
    return output.read_bytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def golden_store(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "root"
    return root, make_store(root)


def customisation_layer(directory: Path) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("etc/motd")
        info.size, info.mtime, info.mode = 5, 1, 0o644
        tar.addfile(info, io.BytesIO(b"hello"))
    directory.mkdir()
    (directory / "layer.tar").write_bytes(buffer.getvalue())
    (directory / "checksum").write_text(digest(buffer.getvalue()) + "\n")
    return directory


def gzip_oci_base(base: bytes, directory: Path) -> Path:
    """The Docker archive `base` as an OCI layout with gzip-compressed layers."""
    with tarfile.open(fileobj=io.BytesIO(base)) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        config_bytes = archive.extractfile(manifest["Config"]).read()  # type: ignore[union-attr]
        layers = [archive.extractfile(name).read() for name in manifest["Layers"]]  # type: ignore[union-attr]
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        (blobs / digest(data)).write_bytes(data)
        return {"mediaType": media_type, "digest": "sha256:" + digest(data), "size": len(data)}

    layer_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    oci_manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(config_bytes, "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(gzip.compress(layer, mtime=0), layer_type) for layer in layers],
    }
    manifest_bytes = json.dumps(oci_manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [blob(manifest_bytes, "application/vnd.oci.image.manifest.v1+json")],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return directory


@pytest.mark.parametrize(
    ("architecture", "golden"), [("amd64", "example"), ("arm64", "example arm64")]
)
def test_the_example_image(cli_runner: Any, tmp_path: Path, architecture: str, golden: str) -> None:
    output = tmp_path / "example.tar"
    result = cli_runner.invoke(
        main, ["build", "-q", "--example", "--architecture", architecture, "-o", str(output)]
    )
    assert result.exit_code == 0, result.output
    assert digest(output.read_bytes()) == GOLDEN[golden]


def test_a_store_with_hard_links_long_and_undecodable_names(
    cli_runner: Any, tmp_path: Path, golden_store: tuple[Path, dict[str, str]]
) -> None:
    root, store = golden_store
    archive = run_build(cli_runner, tmp_path, config(store), root)
    assert digest(archive) == GOLDEN["store"]


def test_a_base_image_and_a_customisation_layer(
    cli_runner: Any, tmp_path: Path, golden_store: tuple[Path, dict[str, str]]
) -> None:
    root, store = golden_store
    base = run_build(
        cli_runner,
        tmp_path,
        config(store, store_layers=[[store["data"]]], config={"Env": ["BASE=1", "PATH=/x"]}),
        root,
    )
    (tmp_path / "base.tar").write_bytes(base)
    document = config(
        store,
        store_layers=[[store["app"]]],
        from_image=str(tmp_path / "base.tar"),
        customisation_layer=str(customisation_layer(tmp_path / "customisation")),
    )
    with_docker_base = run_build(cli_runner, tmp_path, document, root)
    document["from_image"] = str(gzip_oci_base(base, tmp_path / "oci-base"))
    with_oci_base = run_build(cli_runner, tmp_path, document, root)
    assert digest(base) == GOLDEN["base"]
    assert (
        digest(with_docker_base)
        == "3ba3b7094404af956c5d9b27870b6cca490ff1f7fa8525ff5d2b11a83be44d60"
    )
    # A compressed base layer is inflated: the same image as from the Docker archive.
    assert with_oci_base == with_docker_base


def test_a_rebuild_from_the_cache_writes_the_same_bytes(
    cli_runner: Any, tmp_path: Path, golden_store: tuple[Path, dict[str, str]]
) -> None:
    root, store = golden_store
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config(store)))
    outputs = []
    for name in ("cold.tar", "warm.tar"):
        result = cli_runner.invoke(
            main, ["build", "-q", str(config_file), "--root", str(root), "-o", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] == run_build(cli_runner, tmp_path, config(store), root)


# sha256 of what each reading command prints for the archives above, as the
# code before the restructuring printed it: --json shapes and plain text alike
# (some changed on purpose since, as said beside them).
GOLDEN_OUTPUT = {
    "inspect": "9157a81030778f4ba0406c94f32039d7cb4a9a41717f46f23e058eb14ab55efe",
    # Since issue 17: each layer's JSON has "compressed_by" (null in these archives).
    "inspect --json": "01fd76de72f536956599aa6a27de1aef512ce62a991ad3acd35f8b88fdf91bd1",
    # Since issue 15: fixed columns, so that rows stream (the widths were the widest value's).
    "inspect --files": "b2354ddd5269f4993132c3a80abab7bcff6cc14650324356eaf82cb90a87255b",
    # Since issue 17: "compressed_by" in each layer's JSON.
    "inspect --files --json": "45b8e4b4cf035458611a0e3c3b5d528d14296e4e65ac53d3e7f6a729b8ced53a",
    "inspect --files 1 --tree": "519b2380c3e47bcc09c946378ad6ec774b0ba3c88865298464fb159c519fe44d",
    # Since issue 15: plurals ("1 file in more than one layer", not "1 files").
    "inspect b": "c62992033c757abda57f39b35dc792df0611662b27eb53a7533b9aa6baf9c7f4",
    # Since issue 17: "compressed_by" in each layer's JSON.
    "inspect b --files 3": "4320b193d432179983da9041b51e9e3b97b1acc9104e9ff961c742b13b76a71d",
    "verify": "ee3c49501cfe8d0dd47c0387f554390b6fa92f4b4a3dd973b9c57e5da4292c6f",
    "verify --json": "2529aef3307553d62cd7e4e6181f1ee31f1271630188d9bddff2224aa592375e",
    # Since issue 15: the other archive's own checks ("other archive ...") too,
    # and plurals ("1 check failed").
    "verify --against": "bb6acc75f445e79c54dba11cf6be8b16c1530ac53f8c4f24973e9eae529cc049",
    "verify --against --json": "6caba1d8a6d663a45f79878a81892bb89d37931836175d64f285e33eb4183b91",
    "diff-layers": "eb9eba06e96d18dda40e5a063168e51a384ef8d4114ade5c8ff2994ee2488260",
    # Since issue 15: each config change says its kind ("value").
    "diff-layers --json": "6bbbc75040e8053d7f276e995b8bc969dec55f74cdcbe2415f01d6f956eae37e",
}


def test_what_the_readers_print(
    cli_runner: Any,
    tmp_path: Path,
    golden_store: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, store = golden_store
    (tmp_path / "a.tar").write_bytes(run_build(cli_runner, tmp_path, config(store), root))
    # On a.tar, a layer that ships data.json again: waste, and a config change.
    changed = config(
        store,
        config={"Cmd": ["/bin/other"]},
        store_layers=[[store["data"]]],
        from_image=str(tmp_path / "a.tar"),
    )
    (tmp_path / "b.tar").write_bytes(run_build(cli_runner, tmp_path, changed, root))
    commands = {
        "inspect": ["inspect", "a.tar"],
        "inspect --json": ["inspect", "a.tar", "--json"],
        "inspect --files": ["inspect", "a.tar", "--files"],
        "inspect --files --json": ["inspect", "a.tar", "--files", "--json"],
        "inspect --files 1 --tree": ["inspect", "a.tar", "--files", "1", "--tree"],
        "inspect b": ["inspect", "b.tar"],
        "inspect b --files 3": ["inspect", "b.tar", "--files", "3", "--json"],
        "verify": ["verify", "a.tar"],
        "verify --json": ["verify", "a.tar", "--json"],
        "verify --against": ["verify", "a.tar", "--against", "b.tar"],
        "verify --against --json": ["verify", "a.tar", "--against", "b.tar", "--json"],
        "diff-layers": ["diff-layers", "a.tar", "b.tar"],
        "diff-layers --json": ["diff-layers", "a.tar", "b.tar", "--json"],
    }
    monkeypatch.chdir(tmp_path)
    printed = {}
    for name, arguments in commands.items():
        result = cli_runner.invoke(main, arguments)
        assert result.exit_code in (0, 1), result.output
        printed[name] = digest(result.stdout.encode("utf-8", "surrogateescape"))
    assert printed == GOLDEN_OUTPUT
