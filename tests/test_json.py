"""JSON read as Go's encoding/json reads it, or refused: build configs, archives, the cache.

Docker and podman decode manifests and configs with Go's encoding/json. The
promise: what we accept, Go decodes to the same values (checked against Go
itself, tests/support/oracle/oracle.go); what Go decodes otherwise, or
refuses, we refuse with one line and exit 2.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from guix_image import strict_json
from guix_image.errors import ArchiveError
from guix_image.formats.documents import (
    CONTAINER_CONFIG_KEYS,
    IMAGE_CONFIG_KEYS,
    check_key_case,
)

from .support.archives import archive_of, layer_tar
from .support.cli import Cli
from .support.stores import StoreTree, write_config

# Documents every reader must refuse or read alike, as bytes.
TRICKS: dict[str, bytes] = {
    "cmd-twice-by-case": b'{"config": {"Cmd": ["/good"], "cmd": ["/evil"]}}',
    "cmd-twice": b'{"config": {"Cmd": ["/good"], "Cmd": ["/evil"]}}',
    "nan": b'{"config": {"Healthcheck": {"Interval": NaN}}}',
    "infinity": b'{"config": {"Healthcheck": {"Interval": Infinity}}}',
    "overflowing-float": b'{"config": {"Healthcheck": {"Interval": 1e999}}}',
    "huge-integer": b'{"size": ' + b"9" * 5001 + b"}",
    "integer-over-64-bits": b'{"size": 18446744073709551616}',
    "nested-1000-deep": b"[" * 1000 + b"]" * 1000,
    "nested-70-deep": b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}",
    "byte-order-mark": b'\xef\xbb\xbf{"architecture": "amd64"}',
    "utf-16": '{"architecture": "amd64"}'.encode("utf-16"),
    "lone-surrogate": b'{"architecture": "\\ud800"}',
    "lone-surrogate-in-key": b'{"\\udc00": 1}',
    "invalid-utf-8": b'{"architecture": "\xff"}',
}
# JSON that reads alike, but whose keys loaders match to their fields by case:
# the archive readers refuse these (formats/documents.py).
KEY_CASE_TRICKS: dict[str, bytes] = {
    "cmd-in-lower-case": b'{"config": {"cmd": ["/evil"]}}',
    "os-in-upper-case": b'{"OS": "windows"}',
}
CONTROLS: dict[str, bytes] = {
    "config": json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["A=1"], "User": "1000", "WorkingDir": "/w"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
        }
    ).encode(),
    "escapes-and-unicode": b'{"architecture": "\\u0061md64", "os": "\xc3\xa9", "config": {}}',
    "pair-of-surrogates": b'{"os": "\\ud83d\\ude00"}',
    "numbers": b'{"size": 9223372036854775807, "x": -1.5e10}',
    "nested-60-deep": b'{"a": ' + b"[" * 60 + b"]" * 60 + b"}",
}


@pytest.mark.parametrize("name", sorted(TRICKS))
def test_tricks_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(strict_json.JSONRefused) as refused:
        strict_json.loads(TRICKS[name])
    assert str(refused.value)


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_plain_documents_read_as_json_reads_them(name: str) -> None:
    assert strict_json.loads(CONTROLS[name]) == json.loads(CONTROLS[name])


def read_as_a_config(data: bytes) -> Any:
    """A document as the readers take an image config: strict JSON, keys by case."""
    document = strict_json.loads(data)
    if isinstance(document, dict):
        check_key_case(document, IMAGE_CONFIG_KEYS, "config")
        check_key_case(document.get("config"), CONTAINER_CONFIG_KEYS, "config")
    return document


def go_view(oracle: Path, documents: list[bytes], directory: Path) -> list[Any]:
    paths = []
    for number, data in enumerate(documents):
        (directory / f"{number}.json").write_bytes(data)
        paths.append(str(directory / f"{number}.json"))
    result = subprocess.run(
        [str(oracle), "json", *paths], capture_output=True, text=True, check=True, timeout=120
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def our_view(document: Any) -> dict[str, Any]:
    """What the oracle prints of a document, from ours, keys matched exactly."""
    settings = document.get("config")
    rootfs = document.get("rootfs")
    return {
        "Architecture": document.get("architecture", ""),
        "OS": document.get("os", ""),
        "Config": None
        if settings is None
        else {
            "Cmd": settings.get("Cmd"),
            "Entrypoint": settings.get("Entrypoint"),
            "Env": settings.get("Env"),
            "User": settings.get("User", ""),
            "WorkingDir": settings.get("WorkingDir", ""),
        },
        "Rootfs": None
        if rootfs is None
        else {"Type": rootfs.get("type", ""), "diff_ids": rootfs.get("diff_ids")},
        "Manifests": None,
        "Layers": None,
    }


@pytest.mark.tools
def test_what_we_accept_go_decodes_alike(oracle: Path, tmp_path: Path) -> None:
    documents = {**CONTROLS, **TRICKS, **KEY_CASE_TRICKS}
    names = sorted(documents)
    answers = go_view(oracle, [documents[name] for name in names], tmp_path)
    accepted = 0
    for name, answer in zip(names, answers, strict=True):
        try:
            document = read_as_a_config(documents[name])
        except (strict_json.JSONRefused, ArchiveError):
            continue
        accepted += 1
        assert "value" in answer, f"{name}: we read what Go refuses: {answer}"
        if isinstance(document, dict):
            assert answer["value"] == our_view(document), name
    assert accepted == len(CONTROLS)
    # Go decodes these tricks otherwise than a plain reading: the reason they are refused.
    by_name = dict(zip(names, answers, strict=True))
    assert by_name["cmd-twice-by-case"]["value"]["Config"]["Cmd"] == ["/evil"]
    assert by_name["cmd-in-lower-case"]["value"]["Config"]["Cmd"] == ["/evil"]
    assert "error" in by_name["nan"] and "error" in by_name["byte-order-mark"]


def test_a_lower_case_key_of_a_loaders_field_is_refused_in_an_archive(
    tmp_path: Path, cli: Cli
) -> None:
    """`cmd` for `Cmd`: docker runs it, so a reading that misses it must not pass."""
    layer = layer_tar([("f", b"1")])
    for config in ({"config": {"cmd": ["/evil"]}}, {"Variant": "v8"}):
        archive = archive_of([layer], tmp_path / "a.tar", **config)
        result = cli("inspect", str(archive))
        assert result.exit_code == 2, (config, result.output)
        assert "is read by loaders as" in result.stderr and result.stderr.count("\n") == 1
        result = cli("verify", str(archive))  # a failed check: the archive is unreadable
        assert result.exit_code == 1, (config, result.output)
        assert "FAIL  archive readable" in result.stdout and "is read by loaders as" in (
            result.stdout
        )


@pytest.mark.parametrize(
    "config",
    [
        b'[{"Config": "c.json", "config": "d.json", "RepoTags": [], "Layers": []}]',
        b'\xef\xbb\xbf[{"Config": "c.json", "RepoTags": [], "Layers": []}]',
        '[{"Config": "c.json", "RepoTags": [], "Layers": []}]'.encode("utf-16"),
    ],
    ids=["duplicate-key", "byte-order-mark", "utf-16"],
)
def test_a_manifest_go_reads_otherwise_is_refused(config: bytes, tmp_path: Path, cli: Cli) -> None:
    import io
    import tarfile

    archive = tmp_path / "m.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
    result = cli("inspect", str(archive))
    assert result.exit_code == 2 and "manifest.json is" in result.stderr, result.output
    assert result.stderr.count("\n") == 1
    result = cli("verify", str(archive))
    assert result.exit_code == 1 and "manifest.json is" in result.stdout, result.output
    assert "FAIL  archive readable" in result.stdout


@pytest.mark.parametrize(
    "trick", ["cmd-twice-by-case", "overflowing-float", "huge-integer", "nested-1000-deep"]
)
def test_a_build_config_go_would_read_otherwise_is_bad_input(
    trick: str, store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    document = store.config([[store.item("x", {"f": "1"})]])
    text = json.dumps(document)
    insert = {
        "cmd-twice-by-case": '"Config": {}, ',
        "overflowing-float": '"extra": 1e999, ',
        "huge-integer": '"uid": ' + "1" * 5001 + ", ",
        "nested-1000-deep": '"extra": ' + "[" * 1000 + "]" * 1000 + ", ",
    }[trick]
    if trick == "cmd-twice-by-case":
        text = text.replace('"config": {}', '"config": {"Cmd": ["/a"], "CMD": ["/b"]}')
    else:
        text = "{" + insert + text[1:]
    config = tmp_path / "c.json"
    config.write_text(text)
    result = cli("build", str(config), "-o", str(tmp_path / "o.tar"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert not (tmp_path / "o.tar").exists()


def test_a_cache_entry_go_would_read_otherwise_is_ignored(
    store: StoreTree, tmp_path: Path, private_cache: Path, cli: Cli
) -> None:
    config = write_config(tmp_path / "c.json", store.config([[store.item("x", {"f": "1"})]]))
    assert cli("build", str(config), "-o", str(tmp_path / "1.tar")).exit_code == 0
    [entry] = (private_cache / "layers").glob("*.json")
    entry.write_bytes(b'{"size": ' + b"7" * 5001 + b"}")
    result = cli("build", str(config), "-o", str(tmp_path / "2.tar"))
    assert result.exit_code == 0, result.output
    assert "ignoring unreadable cache entry" in result.stderr
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
