"""`verify --store`: an image's store items against the store database (NAR hashes,
references, items shipped twice), with a database made by the tests, and with a
real Nix store where Debian's nix-bin is installed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .support.cli import Cli
from .support.nar import nar_hash
from .support.stores import BuildFn, StoreTree, make_database, populate


def store_checks(cli: Cli, archive: Path, *arguments: str) -> tuple[int, dict[str, dict]]:
    result = cli("verify", str(archive), "--json", *arguments)
    assert result.exit_code in (0, 1), result.output
    checks = json.loads(result.stdout)["checks"]
    return result.exit_code, {c["name"]: c for c in checks if c["name"].startswith("store")}


def test_an_image_checked_against_its_store(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
    """Every kind of file (executable, symlinks, nested and empty directories, names
    not UTF-8, hard links), NAR hashes computed from the layers as they stream,
    equal to those computed from the disk by the reference serialiser; then a
    wrong hash, a hole in the closure and an item in two layers, each caught."""
    app, data, alias = populate(store)
    hashes = {item: nar_hash(item) for item in (app, data, alias)}
    refs = {app: [app, data], alias: [app]}  # an item may refer to itself
    database = make_database(tmp_path / "db.sqlite", hashes, refs)
    store_dir = str(store.store_dir)
    archive, _ = build(store.config([[app], [data, alias]]))
    code, checks = store_checks(cli, archive, "--store", store_dir, "--db", str(database))
    assert code == 0, checks
    assert len(checks) == 4 and all(check["ok"] for check in checks.values())

    wrong = make_database(tmp_path / "wrong.sqlite", {**hashes, data: "sha256:" + "0" * 64}, refs)
    code, checks = store_checks(cli, archive, "--store", store_dir, "--db", str(wrong))
    assert code == 1
    assert not checks["store items' NAR hashes"]["ok"]
    assert (
        f"{data} (layer 2): {hashes[data]}, registered sha256:000"
        in (checks["store items' NAR hashes"]["actual"])
    )

    without_data, _ = build(store.config([[app, alias]]))
    code, checks = store_checks(cli, without_data, "--store", store_dir, "--db", str(database))
    assert code == 1
    assert checks["store closure complete"]["actual"] == f"1: {app} refers to {data}"

    twice, _ = build(store.config([[app, data, alias], [app]]))
    code, checks = store_checks(cli, twice, "--store", store_dir, "--db", str(database))
    assert code == 1
    assert checks["store items in one layer each"]["actual"] == f"1: {app} (layers 1, 2)"


def test_an_item_the_store_does_not_know_and_a_missing_database(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
    app, data, _ = populate(store)
    database = make_database(tmp_path / "db.sqlite", {app: nar_hash(app)}, {})
    archive, _ = build(store.config([[app, data]]))
    store_dir = str(store.store_dir)
    code, checks = store_checks(cli, archive, "--store", store_dir, "--db", str(database))
    assert code == 1
    assert checks["store items registered in the store"]["actual"] == f"1: {data}"
    result = cli("verify", str(archive), "--store", store_dir)
    assert result.exit_code == 2
    assert f"no store database found for {store_dir}: give it with --db PATH" in result.stderr
    result = cli("verify", "-", "--store", store_dir, input=archive.read_bytes())
    assert result.exit_code == 2 and "give an archive file" in result.stderr


# -- a real Nix store ---------------------------------------------------------------


def test_an_image_of_a_real_nix_store_is_checked_against_it(
    nix_items: list[str], build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
    """The store directory and the database are found without being named; our NAR
    hashes are Nix's (and `nix-store --dump` agrees with the reference serialiser)."""
    dep, app = sorted(nix_items, key=lambda path: "-app-" in path)
    dumped = subprocess.run(["nix-store", "--dump", app], capture_output=True, check=True)
    assert "sha256:" + __import__("hashlib").sha256(dumped.stdout).hexdigest() == nar_hash(
        Path(app)
    )
    config = {
        "architecture": "amd64",
        "created": "2024-01-01T00:00:00Z",
        "repo_tag": "nix/app:1",
        "store_dir": "/nix/store",
        "store_layers": [[app], [dep]],
    }
    archive, _ = build(config)
    code, checks = store_checks(cli, archive, "--store")
    assert code == 0, checks
    assert checks["store items registered in the store"]["expected"] == "all 2 store items"
    partial, _ = build({**config, "store_layers": [[app]]})
    code, checks = store_checks(cli, partial, "--store")
    assert code == 1
    assert checks["store closure complete"]["actual"] == f"1: {app} refers to {dep}"
