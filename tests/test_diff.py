"""`diff-layers`: what changed between two archives, file by file, and its report."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from guix_image.build.engine import BuildResult

from .support.archives import (
    TAMPERED,
    archive_of,
    files_of,
    layer_tar,
    tamper_with,
    write_files,
)
from .support.cli import Cli, inspect_json
from .support.stores import BuildFn, StoreTree
from .support.tools import convert, tampered_copy


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
    assert {"field": "config.Env", "a": ["V=1"], "b": ["V=2"], "kind": "value"} in diff["config"]
    full = prefix + "bin/tool"
    assert (tmp_path / "report" / "a" / full).read_text() == "v1"
    assert (tmp_path / "report" / "b" / full).read_text() == "v2!"
    mode = (item / "bin" / "tool").stat().st_mode & 0o777
    assert (tmp_path / "report" / "b" / full).stat().st_mode & 0o777 == mode  # its own mode
    # Metadata-only changes, which no copy shows, are listed beside the copies.
    metadata = json.loads((tmp_path / "report" / "metadata-changes.json").read_text())
    assert prefix + "share/same" in {change["path"] for change in metadata}
    assert full not in {change["path"] for change in metadata}
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


def damaged_copy(good: Path, target: Path) -> Path:
    """`good` with one byte flipped inside the contents of a file of its layer."""
    target.write_bytes(good.read_bytes())
    tamper_with(target, "flipped-byte")
    return target


def test_a_flipped_byte_is_never_identical(tmp_path: Path, cli: Cli) -> None:
    """The layers claim the same diff_id at the same place: their bytes are hashed
    anyway, and the damaged archive is named (it used to be "Identical.")."""
    layer = layer_tar([("d", None), ("d/big", b"x" * 100_000)])
    good = archive_of([layer], tmp_path / "a.tar")
    bad = damaged_copy(good, tmp_path / "bad.tar")
    for first, second in ((good, bad), (bad, good)):
        result = cli("diff-layers", str(first), str(second), "--json")
        assert result.exit_code == 2, result.output
        assert f"{bad}: layer 1's bytes hash to sha256:" in result.stderr
        assert "the archive is damaged" in result.stderr
        assert json.loads(result.stdout)["exit_code"] == 2  # --json: the error as JSON too
    assert cli("diff-layers", str(good), str(good)).exit_code == 0


def reserialised(archive: Path, target: Path) -> Path:
    """`archive` with its config written in other bytes (indented), the same fields:
    as a podman re-save can do."""
    members = files_of(archive)
    [entry] = json.loads(members.pop("manifest.json"))
    config = json.loads(members.pop(entry["Config"]))
    data = json.dumps(config, indent=2).encode()
    entry["Config"] = hashlib.sha256(data).hexdigest() + ".json"
    members[entry["Config"]] = data
    members["manifest.json"] = json.dumps([entry]).encode()
    write_files(target, members)
    return target


def test_a_config_in_other_bytes_is_one_verdict(tmp_path: Path, cli: Cli) -> None:
    """Same layers, same config fields, other config bytes: the image IDs differ, so
    diff-layers says so (kind "serialisation", exit 1) as verify --against does."""
    layer = layer_tar([("d", None), ("d/f", b"x")])
    first = archive_of([layer], tmp_path / "a.tar", config={"Cmd": ["/d/f"]})
    second = reserialised(first, tmp_path / "b.tar")
    result = cli("diff-layers", str(first), str(second), "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["identical"] is False and report["files"] == []
    [change] = report["config"]
    assert change["kind"] == "serialisation" and change["a"] != change["b"]
    text = cli("diff-layers", str(first), str(second))
    assert "the same fields, in other bytes" in text.stdout
    verdict = cli("verify", str(first), "--against", str(second), "--json")
    assert verdict.exit_code == 1
    failed = [c["name"] for c in json.loads(verdict.stdout)["checks"] if not c["ok"]]
    assert failed == ["against config digest"]


def layer_with_xattrs(xattrs: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bin/tool")
        info.size = 1
        info.pax_headers = xattrs
        tar.addfile(info, io.BytesIO(b"x"))
    return buffer.getvalue()


def test_an_xattr_difference_is_shown_and_compared(tmp_path: Path, cli: Cli) -> None:
    """A file capability (SCHILY.xattr.security.capability) on one side only: the
    difference is named (it was exit 1 with an empty file list)."""
    plain = archive_of([layer_with_xattrs({})], tmp_path / "a.tar")
    capable = archive_of(
        [
            layer_with_xattrs(
                {"SCHILY.xattr.security.capability": "cap", "LIBARCHIVE.xattr.user.b%20c": "dg=="}
            )
        ],
        tmp_path / "b.tar",
    )
    listing = inspect_json(cli, capable, "--files")["listing"]
    assert listing[0]["xattrs"] == {"security.capability": "cap", "user.b c": "v"}
    assert "xattrs" not in inspect_json(cli, plain, "--files")["listing"][0]
    result = cli("diff-layers", str(plain), str(capable), "--json")
    assert result.exit_code == 1
    [change] = json.loads(result.stdout)["files"]
    assert change["path"] == "bin/tool" and change["change"] == "modified"
    assert [field["field"] for field in change["fields"]] == ["xattrs"]


def test_modes_are_octal_in_text_and_json(tmp_path: Path, cli: Cli) -> None:
    def layer(mode: int) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo("bin/tool")
            info.size, info.mode = 1, mode
            tar.addfile(info, io.BytesIO(b"x"))
        return buffer.getvalue()

    a = archive_of([layer(0o644)], tmp_path / "a.tar")
    b = archive_of([layer(0o755)], tmp_path / "b.tar")
    result = cli("diff-layers", str(a), str(b), "--json")
    [change] = json.loads(result.stdout)["files"]
    assert change["fields"] == [{"field": "mode", "a": "0644", "b": "0755"}]
    assert "mode: 0644 -> 0755" in cli("diff-layers", str(a), str(b)).stdout


@pytest.mark.parametrize(("form", "tamper"), TAMPERED)
def test_a_tampered_archive_is_never_compared_as_sound(
    image: tuple[Path, BuildResult], form: str, tamper: str, tmp_path: Path, cli: Cli
) -> None:
    """The tamper matrix, for diff-layers: whatever the form, one flipped byte in a
    layer, a descriptor's wrong size or a missing blob is named (exit 2), never
    "Identical." (verify's side is in test_verify.py)."""
    archive, _ = image
    (tmp_path / "good").mkdir()
    good = Path(convert(archive, form, tmp_path / "good"))
    bad = tampered_copy(archive, form, tamper, tmp_path / "bad")
    result = cli("diff-layers", str(good), str(bad), "--json")
    assert result.exit_code == 2, result.output
    assert json.loads(result.stdout)["exit_code"] == 2
    assert str(bad) in result.stderr
