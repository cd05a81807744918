"""`inspect`: its JSON, the waste and the merged filesystem, the listings, and the
layer readers it runs on (forked processes report what threads do)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from guix_image.build.engine import BuildResult

from .support.archives import archive_of, flip_byte, layer_tar, member, pax, pax_record, tar
from .support.cli import Cli, inspect_json
from .support.tools import GUIX_IMAGE, require


def test_inspect_json_is_documented_and_complete(image: tuple[Path, BuildResult], cli: Cli) -> None:
    archive, result = image
    summary = inspect_json(cli, archive)
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


def test_waste_whiteouts_and_the_merged_filesystem(tmp_path: Path, cli: Cli) -> None:
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
    summary = inspect_json(cli, archive)
    assert summary["waste"]["bytes"] == 100_000 + 5000 + 700
    assert summary["waste"]["largest"][0] == {"path": "etc/big", "bytes": 100_000, "layers": [1, 2]}
    assert summary["waste"]["duplicated_files"] == 1
    merged = {entry["path"]: entry for entry in inspect_json(cli, archive, "--files")["listing"]}
    assert set(merged) == {"etc", "etc/big", "opt", "opt/b"}
    assert merged["etc/big"]["layer"] == 2 and merged["etc/big"]["size"] == 5
    tree = cli("inspect", str(archive), "--files", "--tree")
    assert tree.exit_code == 0
    assert "big  (5 B, layer 2)" in tree.stdout


def test_file_names_are_never_markup_or_control_sequences(tmp_path: Path) -> None:
    layer = layer_tar(
        [("pages", None), ("pages/[id].tsx", b"x"), ("pages/[lang]", None), ("e\x1b[31mvil", b"y")]
    )
    archive = archive_of([layer], tmp_path / "m.tar")
    for args in (["--files", "1"], ["--files", "--tree"]):
        listing = subprocess.run(
            [*GUIX_IMAGE, "inspect", str(archive), *args], capture_output=True, text=True
        )
        assert listing.returncode == 0, listing.stderr
        assert "[id].tsx" in listing.stdout and "[lang]" in listing.stdout
        assert "\x1b" not in listing.stdout and "e\\x1b[31mvil" in listing.stdout


def test_waste_efficiency_is_measured_on_uncompressed_bytes(tmp_path: Path, cli: Cli) -> None:
    lower = layer_tar([("big", b"\0" * 1_000_000)])
    upper = layer_tar([("big", b"small")])
    compressed = [gzip.compress(lower, mtime=0), gzip.compress(upper, mtime=0)]
    archive = archive_of([lower, upper], tmp_path / "g.tar", stored=compressed)
    result = cli("inspect", str(archive), "--json")
    assert result.exit_code == 0, result.stderr
    waste = json.loads(result.stdout)["waste"]
    assert waste["bytes"] == 1_000_000
    assert 0 < waste["efficiency"] < 1


# Reads the layers of an archive (argv[1]) as a ReadOptions of layer_tar (argv[2]
# names it) says, in a process of its own that runs one thread, so that it may
# fork: first forked (fork_min_bytes=0: any size forks), then not (a size no
# archive reaches). forked_map is wrapped, not replaced: the real one does the
# work, and the wrapper notes each call and the processes the layers were read
# in. Prints what it found as JSON, with the checks verify fails (check_archive
# reads with the default fork_min_bytes: on threads, for archives this small).
FORKED_READS = """
import json, os, sys

from guix_image import fastpath
from guix_image.analysis.read import read_layers
from guix_image.analysis.verify import check_archive
from guix_image.fastpath import forkmap
from guix_image.formats import layer_tar
from guix_image.formats.images import read_images
from guix_image.formats.sources import open_source

archive, option = sys.argv[1:]
options = getattr(layer_tar, option)
real_forked_map, calls = forkmap.forked_map, []


def forked_map(function, items, processes=2):
    results = real_forked_map(lambda item: (os.getpid(), function(item)), items, processes)
    calls.append(sorted({pid for pid, _ in results}))
    return [result for _, result in results]


def plain(contents):
    # Its fields, its rows as a list (read back from the scratch file where spilled).
    return {**vars(contents), "rows": list(contents.rows)}


forkmap.forked_map = forked_map
found = {"pid": os.getpid(), "can_fork": fastpath.can_fork()}
with open_source(archive, options) as source:
    [image] = read_images(source)
    forked = read_layers(source, image, options, fork_min_bytes=0)
    found["forked_calls"] = list(calls)
    threaded = read_layers(source, image, options, fork_min_bytes=1 << 62)
    found["threaded_calls"] = len(calls) - len(found["forked_calls"])
    found["equal"] = list(map(plain, forked)) == list(map(plain, threaded))
    found["entries"] = [contents.entries for contents in forked]
    found["diff_ids_match"] = [
        contents.diff_id == layer.diff_id for contents, layer in zip(forked, image.layers)
    ]
    found["clean"] = all(not (contents.duplicates or contents.unsafe) for contents in forked)
    found["verify_failed"] = [c.name for c in check_archive(source, image).checks if not c.ok]
print(json.dumps(found))
"""


def read_forked_and_threaded(archive: Path, option: str) -> dict[str, Any]:
    """What FORKED_READS found, in a fresh process, having checked that it forked."""
    child = subprocess.run(
        [sys.executable, "-c", FORKED_READS, str(archive), option],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    found: dict[str, Any] = json.loads(child.stdout)
    assert found["can_fork"] is True, option
    # forked_map was called once, by the forked read, and the layers were read
    # in other processes; the other read did not call it.
    assert len(found["forked_calls"]) == 1, (option, found)
    [workers] = found["forked_calls"]
    assert workers and found["pid"] not in workers, (option, found)
    assert found["threaded_calls"] == 0, option
    return found


def test_forked_readers_report_what_threads_do(
    image: tuple[Path, BuildResult], tmp_path: Path
) -> None:
    archive, _ = image
    # What verify, inspect and inspect --files read.
    found = {
        option: read_forked_and_threaded(archive, option)
        for option in ("DIGESTS", "HEADERS", "RECORDS", "FILES")
    }
    for option, read in found.items():
        assert read["equal"] is True, option
        assert all(read["entries"]), option
    assert found["DIGESTS"]["diff_ids_match"] == [True, True]
    assert found["DIGESTS"]["verify_failed"] == []
    with tarfile.open(archive) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("/layer.tar"))
    data = bytearray(archive.read_bytes())
    flip_byte(data, member.offset_data + 1024, member.offset_data + member.size - 1024)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data)
    forked = read_forked_and_threaded(broken, "DIGESTS")
    assert forked["equal"] is True
    # The forked read finds layer 1's diff_id wrong, and nothing else; so does verify.
    assert forked["diff_ids_match"] == [False, True]
    assert forked["clean"] is True
    assert forked["verify_failed"] == ["layer 1 diff_id"]


def test_a_layer_of_a_pipe_is_listed_as_of_standard_input(
    image: tuple[Path, BuildResult], cli: Cli
) -> None:
    """`inspect <(...) --files N` reads the stream once with full records, as for `-`."""
    archive, _ = image
    listed = subprocess.run(  # /dev/stdin a pipe: a path that is not a regular file
        [*GUIX_IMAGE, "inspect", "/dev/stdin", "--files", "2", "--json"],
        input=archive.read_bytes(),
        capture_output=True,
    )
    assert listed.returncode == 0, listed.stderr
    from_file = inspect_json(cli, archive, "--files", "2")
    assert json.loads(listed.stdout)["listing"] == from_file["listing"]
    assert any(entry["path"].endswith("/bin/link") for entry in from_file["listing"])


def test_trees_and_whiteouts_1000_deep_are_read(tmp_path: Path, cli: Cli) -> None:
    deep = "/".join(["d"] * 1000)
    lower = layer_tar([("d", None), (deep, None), (deep + "/f", b"x")])
    upper = layer_tar([("d/.wh.d", b"")])
    archive = archive_of([lower, upper], tmp_path / "deep.tar")
    for arguments in (["--json"], ["--files", "--json"], ["--files", "1", "--tree"]):
        result = cli("inspect", str(archive), *arguments)
        assert result.exit_code == 0, result.output[-500:]
    merged = inspect_json(cli, archive, "--files")["listing"]
    assert [entry["path"] for entry in merged] == ["d"]


def test_an_opaque_directory_hides_the_lower_layers_as_umoci_does(tmp_path: Path, cli: Cli) -> None:
    """Below an opaque whiteout, nothing of the lower layers shows, even below a
    subdirectory the upper layer declares again."""
    require("skopeo")
    require("umoci")
    lower = layer_tar(
        [("a", None), ("a/b", None), ("a/b/f", b"lower"), ("a/g", b"lower"), ("k", b"kept")]
    )
    upper = layer_tar([("a", None), ("a/b", None), ("a/.wh..wh..opq", b""), ("a/h", b"upper")])
    archive = archive_of([lower, upper], tmp_path / "opaque.tar")
    listed = {entry["path"] for entry in inspect_json(cli, archive, "--files")["listing"]}
    layout = tmp_path / "layout"
    subprocess.run(
        ["skopeo", "copy", "-q", f"docker-archive:{archive}", f"oci:{layout}:t"],
        check=True,
        capture_output=True,
    )
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:t", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    unpacked = {path.relative_to(rootfs).as_posix() for path in rootfs.rglob("*")}
    assert listed == unpacked == {"a", "a/b", "a/h", "k"}


def test_listings_stream_as_the_json_of_the_whole_document(tmp_path: Path, cli: Cli) -> None:
    """`--files --json` is written entry by entry: the text is exactly what Python's
    json writes for the whole document, whatever the names (non-ASCII, not UTF-8,
    control characters), times (fractional) and listings (empty), and the merged
    view comes in tree order (a directory's entries right after it)."""
    lower = tar(
        member("a/", typeflag=b"5"),
        member("a/b", b"1"),
        member("a.c", b"22"),
        member(b"caf\xc3\xa9-\xff\x01", b"333"),
        pax(pax_record("mtime", "1700000000.25")),
        member("t", b"4444"),
    )
    archive = archive_of([lower, tar()], tmp_path / "names.tar")
    for listed in ([], ["1"], ["2"]):
        result = cli("inspect", str(archive), "--files", *listed, "--json")
        assert result.exit_code == 0, result.stderr
        text = result.stdout
        assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=True) + "\n"
    merged = inspect_json(cli, archive, "--files")["listing"]
    assert [entry["path"] for entry in merged] == ["a", "a/b", "a.c", "caf\u00e9-\udcff\x01", "t"]
    assert merged[-1]["mtime"] == 1700000000.25
    assert inspect_json(cli, archive, "--files", "2")["listing"] == []


def test_a_ci_gate_as_dive_has_it(tmp_path: Path, cli: Cli, monkeypatch: Any) -> None:
    """dive's rules and defaults (efficiency 0.9, user-wasted 0.1, wasted bytes
    disabled), from flags or a .dive-ci file, PASS/FAIL per rule, exit 1 on a FAIL."""
    lower = layer_tar([("etc", None), ("etc/big", b"x" * 100_000)])
    upper = layer_tar([("etc", None), ("etc/big", b"small")])
    archive = archive_of([lower, upper], tmp_path / "waste.tar")
    monkeypatch.chdir(tmp_path)
    result = cli("inspect", str(archive), "--ci", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["wasted_bytes"] == 100_000
    upper_size = len(upper)
    assert report["user_wasted_percent"] == round(100_000 / upper_size, 4)
    statuses = {rule["name"]: rule["status"] for rule in report["rules"]}
    assert statuses == {
        "lowestEfficiency": "FAIL",
        "highestWastedBytes": "SKIP",
        "highestUserWastedPercent": "FAIL",
    }
    (tmp_path / ".dive-ci").write_text(
        "rules:\n  # relaxed\n  lowestEfficiency: 0.05\n  highestWastedBytes: 1MB\n"
        "  highestUserWastedPercent: disabled\n"
    )
    text = cli("inspect", str(archive), "--ci")
    assert text.exit_code == 0, text.output
    assert "Result:PASS [Total:3] [Passed:2] [Failed:0] [Warn:0] [Skipped:1]" in text.stdout
    strict = cli("inspect", str(archive), "--ci", "--highest-wasted-bytes", "50kB")
    assert strict.exit_code == 1 and "FAIL: highestWastedBytes" in strict.stdout
    (tmp_path / ".dive-ci").write_text("rules:\n  lowestEffciency: 0.5\n")
    bad = cli("inspect", str(archive), "--ci")
    assert bad.exit_code == 2 and ".dive-ci:2: not a dive CI rule" in bad.stderr
