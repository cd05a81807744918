"""`build STORE_ITEM...`: closures from a store database (made by the tests, and a
real Nix store), layers within --max-layers, the flags as a config would give
them, --print-layers and --emit-config."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from .support.cli import Cli, inspect_json
from .support.nar import nar_hash
from .support.stores import BuildFn, StoreTree, busybox_store, make_database
from .support.tools import docker_answers, podman, run, to_oci, unpack


def small_store(store: StoreTree, tmp_path: Path) -> tuple[list[Path], Path]:
    """app -> lib -> libc, app -> data: a store database that says so."""
    libc = store.item("libc-2.39", {"lib/libc.so": "c" * 5000})
    lib = store.item("lib-1.0", {"lib/lib.so": "l" * 500})
    data = store.item("data", {"share/data": "d"})
    app = store.item("app-1.2", {"bin/app": "a"})
    items = [app, lib, libc, data]
    database = make_database(
        tmp_path / "db.sqlite",
        {item: nar_hash(item) for item in items},
        {app: [lib, data, app], lib: [libc]},
    )
    return items, database


def test_the_closure_of_an_item_is_layered_and_built(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    (app, lib, libc, data), database = small_store(store, tmp_path)
    planned = cli("build", str(app), "--db", str(database), "--print-layers", "--json")
    assert planned.exit_code == 0, planned.output
    layers = [layer["items"] for layer in json.loads(planned.stdout)["layers"]]
    assert sorted(p for layer in layers for p in layer) == sorted(map(str, (app, lib, libc, data)))
    assert layers[-1] == [str(app)]  # the application alone on top (auto)
    archive = tmp_path / "app.tar"
    built = cli("build", str(app), "--db", str(database), "-o", str(archive))
    assert built.exit_code == 0, built.output
    summary = inspect_json(cli, archive)
    assert summary["repo_tags"] == ["app:latest"]  # from the item's name
    assert len(summary["layers"]) == len(layers)
    verdict = cli("verify", str(archive), "--store", str(store.store_dir), "--db", str(database))
    assert verdict.exit_code == 0, verdict.output


def test_max_layers_edges(store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli) -> None:
    (app, *_), database = small_store(store, tmp_path)
    base_item = store.item("base", {"etc/os-release": "x"})
    base, _ = build(store.config([[base_item], [store.item("base2", {"x": "y"})]]))

    def planned(*arguments: str) -> list[list[str]]:
        result = cli(
            "build", str(app), "--db", str(database), "--print-layers", "--json", *arguments
        )
        assert result.exit_code == 0, result.output
        return [layer["items"] for layer in json.loads(result.stdout)["layers"]]

    assert len(planned("--max-layers", "1")) == 1
    assert len(planned("--max-layers", "2")) == 2
    assert len(planned("--max-layers", "100")) == 4  # no more layers than items
    assert len(planned("--max-layers", "3", "--from-image", str(base))) == 1
    refused = cli(
        "build", str(app), "--db", str(database), "--max-layers", "2", "--from-image", str(base)
    )
    assert refused.exit_code == 2
    assert "the base image has 2 layers already" in refused.stderr
    too_many = cli("build", str(app), "--db", str(database), "--max-layers", "126")
    assert too_many.exit_code == 2


def test_flags_give_what_the_same_values_in_a_config_give(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    """`--emit-config c.json ITEMS` then `build c.json` is byte for byte `build ITEMS`,
    and a config written by hand with the same values too."""
    (app, *_), database = small_store(store, tmp_path)
    flags = [
        "--db", str(database), "-t", "app:1.2", "--entrypoint", str(app / "bin" / "app"),
        "--cmd", '["--help"]', "--env", "A=1", "--env", "B=two words", "--workdir", "/",
        "--label", "org.example=yes", "--user", "1000", "--expose", "8080",
        "--architecture", "arm64", "--created", "2024-05-01T00:00:00Z",
    ]  # fmt: skip
    direct = tmp_path / "direct.tar"
    assert cli("build", str(app), *flags, "-o", str(direct)).exit_code == 0
    config = tmp_path / "c.json"
    assert cli("build", str(app), *flags, "--emit-config", str(config)).exit_code == 0
    via_config = tmp_path / "via-config.tar"
    assert cli("build", str(config), "-o", str(via_config)).exit_code == 0
    assert direct.read_bytes() == via_config.read_bytes()
    document = json.loads(config.read_text())
    assert document["config"] == {
        "Entrypoint": [str(app / "bin" / "app")],
        "Cmd": ["--help"],
        "Env": ["A=1", "B=two words"],
        "WorkingDir": "/",
        "Labels": {"org.example": "yes"},
        "User": "1000",
        "ExposedPorts": {"8080/tcp": {}},
    }
    assert document["architecture"] == "arm64" and document["repo_tag"] == "app:1.2"
    by_hand = tmp_path / "by-hand.json"
    by_hand.write_text(json.dumps({**document, "store_layers": document["store_layers"]}))
    again = tmp_path / "by-hand.tar"
    assert cli("build", str(by_hand), "-o", str(again)).exit_code == 0
    assert again.read_bytes() == direct.read_bytes()


def test_what_the_store_does_not_know_and_options_out_of_place(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    (app, *_), database = small_store(store, tmp_path)
    stranger = store.item("stranger", {"x": "1"})
    result = cli("build", str(stranger), "--db", str(database), "-o", str(tmp_path / "o.tar"))
    assert result.exit_code == 2
    assert f"{stranger}: the store does not know this item" in result.stderr
    assert not (tmp_path / "o.tar").exists()
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([[app]])))
    misplaced = cli("build", str(config), "--max-layers", "3", "-o", str(tmp_path / "p.tar"))
    assert misplaced.exit_code == 2 and "--max-layers goes with STORE_ITEMs" in misplaced.stderr


def test_a_real_nix_closure_is_nix_stores(nix_items: list[str], tmp_path: Path, cli: Cli) -> None:
    """The closure from Nix's own database equals `nix-store -qR`; the image passes
    verify --store."""
    app = next(path for path in nix_items if "-app-" in path)
    expected = subprocess.run(
        ["nix-store", "-qR", app], capture_output=True, text=True, check=True
    ).stdout.split()
    planned = cli("build", app, "--print-layers", "--json")
    assert planned.exit_code == 0, planned.output
    found = [p for layer in json.loads(planned.stdout)["layers"] for p in layer["items"]]
    assert sorted(found) == sorted(expected)
    archive = tmp_path / "nix.tar"
    assert cli("build", app, "--entrypoint", app + "/bin/run", "-o", str(archive)).exit_code == 0
    assert cli("verify", str(archive), "--store").exit_code == 0


def test_a_bare_name_is_name_latest_and_tags_repeat(
    store: StoreTree, tmp_path: Path, cli: Cli, podman_storage: Path
) -> None:
    """`-t myapp` is `myapp:latest`, as Docker has it (a bare name in RepoTags made
    docker load and podman fail at the end of the stream); -t again adds names."""
    (app, *_), database = small_store(store, tmp_path)
    archive = tmp_path / "tags.tar"
    built = cli(
        "build", str(app), "--db", str(database), "-t", "myapp", "-t", "other:2", "-o", str(archive)
    )
    assert built.exit_code == 0, built.output
    assert inspect_json(cli, archive)["repo_tags"] == ["myapp:latest", "other:2"]
    loaded = podman(podman_storage, "load", "-i", str(archive)).stdout
    assert "localhost/myapp:latest" in loaded and "localhost/other:2" in loaded
    bad = cli(
        "build", str(app), "--db", str(database), "-t", "Bad Name", "-o", str(tmp_path / "x.tar")
    )
    assert bad.exit_code == 2 and "is not a valid image name" in bad.stderr
    assert not (tmp_path / "x.tar").exists()


def test_an_sbom_of_the_closure_that_a_validator_accepts(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    """CycloneDX 1.5, checked by the CycloneDX project's own validator: every store
    item with its name, version, NAR hash and references; the same bytes twice."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    (app, lib, libc, data), database = small_store(store, tmp_path)
    documents = []
    for name in ("one", "two"):
        sbom = tmp_path / f"{name}.cdx.json"
        built = cli(
            "build", str(app), "--db", str(database), "--sbom", str(sbom),
            "-o", str(tmp_path / f"{name}.tar"),
        )  # fmt: skip
        assert built.exit_code == 0, built.output
        documents.append(sbom.read_text())
    assert documents[0] == documents[1]
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(documents[0]) is None
    bom = json.loads(documents[0])
    by_path = {c["bom-ref"]: c for c in bom["components"]}
    assert sorted(by_path) == sorted(map(str, (app, lib, libc, data)))
    assert (by_path[str(libc)]["name"], by_path[str(libc)]["version"]) == ("libc", "2.39")
    assert by_path[str(app)]["hashes"] == [{"alg": "SHA-256", "content": nar_hash(app)[7:]}]
    dependencies = {d["ref"]: d["dependsOn"] for d in bom["dependencies"]}
    assert dependencies["image"] == [str(app)]
    assert dependencies[str(app)] == sorted(map(str, (lib, data)))
    assert bom["metadata"]["component"]["name"] == "app"


def test_an_image_of_store_items_with_links_and_added_files_runs(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    """`--symlink /bin=bin` (as guix pack -S) and `--add`: a chroot of what umoci
    unpacks, and docker where the daemon answers, run the store's busybox through
    /bin and read the added file; the layer is the same bytes each time, and
    --emit-config keeps it beside the config."""
    busybox = busybox_store(store)
    database = make_database(tmp_path / "db.sqlite", {busybox: nar_hash(busybox)}, {})
    added = tmp_path / "etc-app"
    added.mkdir()
    (added / "greeting").write_text("hello from an added file\n")
    tag = f"guix-image-test/items-{uuid.uuid4().hex[:8]}:1"
    flags = [
        "--db", str(database), "-t", tag, "--symlink", "/bin=bin",
        "--symlink", "/usr/bin/sh=bin/busybox", "--add", f"{added}:/etc/app",
        "--entrypoint", "/bin/busybox",
    ]  # fmt: skip
    archive = tmp_path / "run.tar"
    assert cli("build", str(busybox), *flags, "-o", str(archive)).exit_code == 0
    again = tmp_path / "again.tar"
    assert cli("build", str(busybox), *flags, "-o", str(again)).exit_code == 0
    assert archive.read_bytes() == again.read_bytes()
    config = tmp_path / "c.json"
    assert cli("build", str(busybox), *flags, "--emit-config", str(config)).exit_code == 0
    assert json.loads(config.read_text())["customisation_layer"] == f"{config}.customisation"
    via_config = tmp_path / "via.tar"
    assert cli("build", str(config), "-o", str(via_config)).exit_code == 0
    assert via_config.read_bytes() == archive.read_bytes()
    # As umoci unpacks it, and a chroot runs it: busybox through the link.
    rootfs = unpack(tmp_path, to_oci(tmp_path, archive, "items"), "items")
    chrooted = run("chroot", str(rootfs), "/bin/busybox", "cat", "/etc/app/greeting")
    assert chrooted.stdout == "hello from an added file\n"
    if not docker_answers():
        return
    subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True)
    try:
        shown = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", tag, "cat", "/etc/app/greeting"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert shown.stdout == "hello from an added file\n"
        linked = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--entrypoint", "/usr/bin/sh", tag,
             "-c", "echo through the link"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert linked.stdout == "through the link\n"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_without_a_database_the_closure_comes_from_nix_store(
    nix_items: list[str], tmp_path: Path, cli: Cli
) -> None:
    """No database under the store's root (a chroot store without one): nix-store on
    PATH answers, as `nix-store -qR` does."""
    app = next(path for path in nix_items if "-app-" in path)
    expected = subprocess.run(
        ["nix-store", "-qR", app], capture_output=True, text=True, check=True
    ).stdout.split()
    (tmp_path / "chroot").mkdir()
    planned = cli("build", app, "--root", str(tmp_path / "chroot"), "--print-layers", "--json")
    assert planned.exit_code == 0, planned.output
    found = [p for layer in json.loads(planned.stdout)["layers"] for p in layer["items"]]
    assert sorted(found) == sorted(expected)


def test_what_build_writes_beside_the_image_is_whole_or_absent(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    """--emit-config and --sbom go through the same atomic writes as the archive: into
    a directory that is not there, one line and exit 2, and no temporary file."""
    (app, *_), database = small_store(store, tmp_path)
    for option in ("--emit-config", "--sbom"):
        target = tmp_path / "missing" / "out.json"
        result = cli(
            "build", str(app), "--db", str(database), option, str(target), "--print-layers"
        )
        assert result.exit_code == 2, result.output
        assert "directory" in result.stderr and "does not exist" in result.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
