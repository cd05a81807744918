"""`diff-layers`: what changed between two archives, file by file, and its report."""

from __future__ import annotations

import json
from pathlib import Path

from .support.archives import archive_of, layer_tar
from .support.cli import Cli
from .support.stores import BuildFn, StoreTree


def test_diff_layers_finds_what_changed(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
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


def test_diff_layers_identical_and_semantic(store: StoreTree, build: BuildFn, cli: Cli) -> None:
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


def test_the_same_layers_in_another_order_are_not_identical(tmp_path: Path, cli: Cli) -> None:
    x = layer_tar([("f", b"AAAA")])
    y = layer_tar([("f", b"BBBB")])
    a = archive_of([x, y], tmp_path / "a.tar")
    b = archive_of([y, x], tmp_path / "b.tar")
    result = cli("diff-layers", str(a), str(b), "--json")
    assert result.exit_code == 1
    diff = json.loads(result.stdout)
    assert diff["identical"] is False
    [change] = diff["files"]
    assert change["path"] == "f" and {f["field"] for f in change["fields"]} == {"sha256"}
    repeated = archive_of([x, x], tmp_path / "c.tar")
    single = archive_of([x], tmp_path / "d.tar")
    assert cli("diff-layers", str(single), str(repeated)).exit_code == 1


def test_report_dir_refuses_standard_input_before_writing(
    image_file: Path, tmp_path: Path, cli: Cli
) -> None:
    report = tmp_path / "report"
    result = cli(
        "diff-layers",
        str(image_file),
        "-",
        "--report-dir",
        str(report),
        input=image_file.read_bytes(),
    )
    assert result.exit_code == 2
    assert "--report-dir needs both archives as files" in result.stderr
    assert not report.exists()
