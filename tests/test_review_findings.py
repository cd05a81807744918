"""Cases an independent review found. Each test failed before its fix, but the
last, which pins down a property that already held (the umask).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guix_image import layers
from guix_image.archive import select_image
from guix_image.build import build_image
from guix_image.cli import main
from guix_image.config import validate_config
from guix_image.image import ImageRecord
from guix_image.output import atomic_output

from .conftest import BuildFn, StoreTree, read_archive
from .test_readers import archive_of, layer_tar

GUIX_IMAGE = [sys.executable, "-m", "guix_image"]


def cli(*args: str, input: bytes | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input)


def test_the_same_layers_in_another_order_are_not_identical(tmp_path: Path) -> None:
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


def test_waste_efficiency_is_measured_on_uncompressed_bytes(tmp_path: Path) -> None:
    import gzip

    lower = layer_tar([("big", b"\0" * 1_000_000)])
    upper = layer_tar([("big", b"small")])
    compressed = [gzip.compress(lower, mtime=0), gzip.compress(upper, mtime=0)]
    archive = archive_of([lower, upper], tmp_path / "g.tar", stored=compressed)
    result = cli("inspect", str(archive), "--json")
    assert result.exit_code == 0, result.stderr
    waste = json.loads(result.stdout)["waste"]
    assert waste["bytes"] == 1_000_000
    assert 0 < waste["efficiency"] < 1


def read_manifest_config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("manifest.json"))[0]  # type: ignore[arg-type, no-any-return]


def test_a_small_layer_that_starts_like_json_is_still_a_layer(tmp_path: Path) -> None:
    layer = layer_tar([("[", b"coreutils ships one"), ("{x}", b"")])
    archive = archive_of([layer], tmp_path / "j.tar")
    from_file = json.loads(cli("inspect", str(archive), "--json").stdout)
    piped = cli("inspect", "-", "--json", input=archive.read_bytes())
    assert piped.exit_code == 0, piped.stderr
    assert json.loads(piped.stdout)["layers"] == from_file["layers"]


def test_a_fifo_or_process_substitution_is_read_as_a_stream(
    tmp_path: Path, image_file: Path
) -> None:
    result = subprocess.run(
        f"{sys.executable} -m guix_image inspect <(cat {image_file}) --json",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["repo_tags"] == ["test/image:latest"]


@pytest.fixture
def image_file(store: StoreTree, build: BuildFn) -> Path:
    path, _ = build(store.config([[store.item("s", {"f": "1"})]]))
    return path


def test_report_dir_refuses_standard_input_before_writing(image_file: Path, tmp_path: Path) -> None:
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


def flip_layer_byte(archive: Path, target: Path) -> Path:
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = tar.getmember(read_manifest_config(archive)["Layers"][0])
    data[member.offset_data + member.size - 1100] ^= 1  # inside the end-of-archive zeros
    target.write_bytes(data)
    return target


def test_a_broken_base_image_is_bad_input(store: StoreTree, build: BuildFn, tmp_path: Path) -> None:
    base, _ = build(store.config([[store.item("b", {"f": "x" * 5000})]]))
    broken = flip_layer_byte(base, tmp_path / "broken.tar")
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(store.config([[store.item("t", {"g": "1"})]], from_image=str(broken)))
    )
    result = cli("build", str(config), "-o", str(tmp_path / "out.tar"))
    assert result.exit_code == 2
    assert "has digest sha256:" in result.stderr and "was expected" in result.stderr
    assert not (tmp_path / "out.tar").exists()


def test_malformed_env_and_history_in_an_archive_are_refused(tmp_path: Path) -> None:
    layer = layer_tar([("f", b"1")])
    for bad in (
        {"config": {"Env": [1, 2]}},
        {"config": {"Env": "A=1"}},
        {"history": [{"comment": 5}]},
    ):
        archive = archive_of([layer], tmp_path / "bad.tar", **bad)
        result = cli("inspect", str(archive))
        assert result.exit_code == 2, (bad, result.output)
        assert result.stderr.count("\n") == 1


def test_image_names_match_by_repository_not_by_host() -> None:
    def image(tag: str) -> ImageRecord:
        return ImageRecord("docker-archive", [tag], "c", b"{}", {}, [])

    images = [image("registry:5000/app:1.0"), image("registry:5000/other:2")]
    assert select_image(images, "registry:5000/other", "x") is images[1]
    assert select_image(images, "registry:5000/app", "x") is images[0]
    with pytest.raises(Exception, match="no image is tagged 'registry'"):
        select_image(images, "registry", "x")


def test_build_into_a_closed_pipe_stops_quietly(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("p", {"f": os.urandom(3 << 20).hex()})
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([[item]])))
    pipeline = subprocess.run(
        f"{sys.executable} -m guix_image build -q {config} | head -c 100 > /dev/null; "
        "echo status=${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert pipeline.stdout.strip() == "status=141"
    assert pipeline.stderr == ""


def test_layers_too_big_to_plan_are_walked_twice_with_the_same_bytes(
    store: StoreTree, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = store.item("many", {f"f{i:03d}": str(i) * i for i in range(200)})
    document = store.config([[item], [item]])
    normal, _ = build(document)
    monkeypatch.setattr(layers, "MAX_PLANNED", 10)
    capped, _ = build(document)
    assert normal.read_bytes() == capped.read_bytes()


def test_a_store_changing_between_the_two_walks_fails(
    store: StoreTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = store.item("many", {f"f{i:03d}": "x" for i in range(50)})
    monkeypatch.setattr(layers, "MAX_PLANNED", 10)

    class Grow:
        def layer_started(self, number: int, total: int, description: str) -> None:
            pass

        def layer_sized(self, size: int) -> None:
            (item / "zzz-new").write_text("after the first walk")

        def layer_progress(self, written: int) -> None:
            pass

        def message(self, text: str) -> None:
            pass

    output = tmp_path / "o.tar"
    with pytest.raises(layers.FileChanged, match="changed during the build"):  # noqa: SIM117
        with atomic_output(str(output)) as fd:
            build_image(validate_config(store.config([[item]])), fd, progress=Grow())
    assert not output.exists()


def test_tree_needs_files_and_root_does_not_go_with_example(image_file: Path) -> None:
    assert cli("inspect", str(image_file), "--tree").exit_code == 2
    assert cli("build", "--example", "--root", "/").exit_code == 2


def test_example_does_not_depend_on_the_umask(tmp_path: Path) -> None:
    outputs = []
    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            result = cli("build", "--example", "-q", "-o", str(tmp_path / f"{mask}.tar"))
        finally:
            os.umask(old)
        assert result.exit_code == 0
        outputs.append((tmp_path / f"{mask}.tar").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert read_archive(tmp_path / f"{0o022}.tar")["manifest"][0]["RepoTags"] == [
        "guix-image-example:latest"
    ]
