"""Config parsing and validation: every field, every way to get it wrong."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guix_image.build.config import parse_config, validate_config
from guix_image.build.engine import BuildResult
from guix_image.cli import main
from guix_image.errors import InputError
from guix_image.store.paths import is_inside

BASE: dict[str, Any] = {
    "architecture": "amd64",
    "config": {"Cmd": ["/gnu/store/aaa-hello/bin/hello"], "Env": ["A=1"]},
    "created": "2020-01-01T00:00:00Z",
    "repo_tag": "hello:latest",
    "store_dir": "/gnu/store",
    "from_image": None,
    "store_layers": [["/gnu/store/aaa-hello"], ["/gnu/store/bbb-glibc", "/gnu/store/ccc-gcc"]],
    "customisation_layer": None,
}


def config_with(**changes: Any) -> dict[str, Any]:
    document = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if value is ...:
            del document[key]
        else:
            document[key] = value
    return document


def error_for(document: Any) -> str:
    with pytest.raises(InputError) as info:
        validate_config(document, source="c.json")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_reference_config_is_accepted() -> None:
    config = validate_config(BASE)
    assert config.architecture == "amd64"
    assert config.os == "linux"
    assert config.store_layers == (
        ("/gnu/store/aaa-hello",),
        ("/gnu/store/bbb-glibc", "/gnu/store/ccc-gcc"),
    )
    assert config.created == datetime(2020, 1, 1, tzinfo=UTC)
    assert config.mtime == int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
    assert (config.uid, config.gid, config.uname, config.gname) == (0, 0, "root", "root")
    assert config.customisation_layer is None
    assert config.warnings == ()


def test_nixpkgs_fields_are_accepted() -> None:
    config = validate_config(
        config_with(
            mtime="1970-01-01T00:00:01Z", uid=1000, gid=100, uname="user", gname="users", os="linux"
        )
    )
    assert config.mtime == 1
    assert (config.uid, config.gid, config.uname, config.gname) == (1000, 100, "user", "users")


def test_optional_fields_may_be_absent() -> None:
    config = validate_config(config_with(customisation_layer=..., from_image=..., config=...))
    assert config.customisation_layer is None
    assert config.from_image is None
    assert config.config == {}


def test_now_is_read_once_for_created_and_mtime() -> None:
    moment = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    config = validate_config(config_with(created="now", mtime="now"), now=moment)
    assert config.created == moment
    assert config.mtime == int(moment.timestamp())
    assert config.created_text == "2030-05-06T07:08:09Z"


def test_source_date_epoch_pins_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    config = validate_config(config_with(created="now"))
    assert config.mtime == 86400


def test_naive_times_are_utc_whatever_the_timezone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    config = validate_config(config_with(created="2020-01-01T00:00:00"))
    assert config.mtime == 1577836800


def test_mtime_defaults_to_created() -> None:
    config = validate_config(config_with(created="1999-12-31T23:59:59+01:00"))
    assert config.mtime == int(datetime(1999, 12, 31, 22, 59, 59, tzinfo=UTC).timestamp())


def test_repo_tag_override_wins() -> None:
    config = validate_config(BASE, repo_tag="other/name:2")
    assert config.repo_tag == "other/name:2"


def test_store_paths_are_normalised() -> None:
    config = validate_config(
        config_with(store_dir="/gnu/store/", store_layers=[["/gnu/store//aaa-x/"]])
    )
    assert config.store_dir == "/gnu/store"
    assert config.store_layers == (("/gnu/store/aaa-x",),)


def test_unknown_fields_warn() -> None:
    config = validate_config(config_with(mtim="now"), source="c.json")
    assert config.warnings == ("c.json: unknown config field 'mtim' ignored",)


def test_unusual_architecture_warns_with_a_hint() -> None:
    config = validate_config(config_with(architecture="x86_64"))
    assert any("did you mean 'amd64'" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ([], "the config must be a JSON object, not a list"),
        (config_with(architecture=...), "'architecture': is missing"),
        (config_with(architecture=""), "'architecture': must not be empty"),
        (config_with(architecture=64), "'architecture': must be a string, not a number"),
        (config_with(store_dir=...), "'store_dir': is missing"),
        (config_with(store_dir="gnu/store"), "'store_dir': gnu/store is not an absolute path"),
        (config_with(store_layers=...), "'store_layers': is missing"),
        (config_with(store_layers={"a": 1}), "'store_layers': must be a list, not an object"),
        (
            config_with(store_layers=["/gnu/store/x"]),
            "'store_layers'[0]: must be a list of store paths",
        ),
        (
            config_with(store_layers=[[1]]),
            "'store_layers'[0][0]: must be a store path string, not a number",
        ),
        (config_with(store_layers=[[""]]), "'store_layers'[0][0]: must be a store path string"),
        (
            config_with(store_layers=[["/gnu/store/a"], ["/gnu/store2/x"]]),
            "'store_layers'[1][0]: /gnu/store2/x is not inside store_dir /gnu/store",
        ),
        (
            config_with(store_layers=[["/gnu/store/../etc"]]),
            "'store_layers'[0][0]: /gnu/store/../etc is not inside store_dir /gnu/store",
        ),
        (config_with(store_layers=[["/gnu/store"]]), "is not inside store_dir /gnu/store"),
        (
            config_with(store_layers=[["gnu/store/a"]]),
            "'store_layers'[0][0]: gnu/store/a is not an absolute path",
        ),
        (config_with(created=...), "'created': is missing"),
        (config_with(created="yesterday"), "'created': 'yesterday' is not an ISO 8601 time"),
        (config_with(created=0), "'created': must be a string, not a number"),
        (config_with(mtime="soon"), "'mtime': 'soon' is not an ISO 8601 time"),
        (config_with(mtime="1960-01-01T00:00:00Z"), "'mtime': is outside 1970..2242"),
        (config_with(config=[]), "'config': must be an object, not a list"),
        (config_with(config={"Env": "A=1"}), "'config'.'Env': must be a list of strings"),
        (
            config_with(config={"Env": ["NOVALUE"]}),
            "'config'.'Env'[0]: 'NOVALUE' is not NAME=VALUE",
        ),
        (config_with(config={"Cmd": "/bin/sh"}), "'config'.'Cmd': must be a list of strings"),
        (
            config_with(config={"Labels": {"a": 1}}),
            "'config'.'Labels': must be an object of strings",
        ),
        (config_with(config={"User": 0}), "'config'.'User': must be a string"),
        (config_with(repo_tag=5), "'repo_tag': must be a string, not a number"),
        (
            config_with(repo_tag="Hello World"),
            "'repo_tag': 'Hello World' is not a valid image name",
        ),
        (config_with(from_image=3), "'from_image': must be a string, not a number"),
        (config_with(from_image=""), "'from_image': must not be empty"),
        (
            config_with(customisation_layer=[]),
            "'customisation_layer': must be a string, not a list",
        ),
        (config_with(uid=-1), "'uid': must be a number from 0 to 4294967295, not -1"),
        (config_with(gid=2**40), "'gid': must be a number from 0 to 4294967295"),
        (
            config_with(created="9999-12-31T23:59:59-10:00"),
            "'created': '9999-12-31T23:59:59-10:00' is outside the years",
        ),
        (config_with(store_layers=[["/gnu/store/a\u0000"]]), "holds a NUL character"),
        (config_with(from_image="-"), "'from_image': must name a file or directory, not"),
        (
            config_with(customisation_layer="/x\u0000"),
            "'customisation_layer': '/x\\x00' holds a NUL",
        ),
        (config_with(repo_tag="foo:1\n"), "'repo_tag': 'foo:1\\n' is not a valid image name"),
        (
            config_with(repo_tag="foo:1\u00e9"),
            "'repo_tag': 'foo:1\u00e9' is not a valid image name",
        ),
        (config_with(uid="0"), "'uid': must be a number, not a string"),
        (config_with(gid=True), "'gid': must be a number, not a boolean"),
        (config_with(uname=0), "'uname': must be a string, not a number"),
        (config_with(os=""), "'os': must not be empty"),
    ],
)
def test_bad_config_names_the_field(document: Any, expected: str) -> None:
    message = error_for(document)
    assert message.startswith("c.json: ")
    assert expected in message


def test_not_json_is_a_clear_error() -> None:
    with pytest.raises(InputError, match=r"^c.json: not valid JSON: Expecting"):
        parse_config('{"architecture": "amd64",', source="c.json")


def test_nan_is_not_json() -> None:
    with pytest.raises(InputError, match=r"^c.json: not valid JSON: NaN is not JSON"):
        parse_config('{"architecture": "amd64", "config": {"x": NaN}}', source="c.json")


def test_not_utf8_is_a_clear_error() -> None:
    with pytest.raises(InputError, match=r"^c.json: not UTF-8 text"):
        parse_config(b'{"a": "\xff"}', source="c.json")


def test_path_prefix_check_is_by_component() -> None:
    assert is_inside("/gnu/store/a", "/gnu/store")
    assert not is_inside("/gnu/store2/a", "/gnu/store")
    assert not is_inside("/gnu/store", "/gnu/store")
    assert is_inside("/x", "/")


def test_valid_repo_tags() -> None:
    """A name without a tag is NAME:latest, as Docker has it (RepoTags of a bare
    name make docker load and podman fail at the end of the stream)."""
    for tag, expected in (
        ("hello", "hello:latest"),
        ("hello:latest", "hello:latest"),
        ("localhost:5000/team/app:1.0", "localhost:5000/team/app:1.0"),
        ("localhost:5000/team/app", "localhost:5000/team/app:latest"),
        ("a/b/c:v1.2-rc_3", "a/b/c:v1.2-rc_3"),
        ("Registry.Example.com/x", "Registry.Example.com/x:latest"),
    ):
        assert validate_config(BASE, repo_tag=tag).repo_tag == expected
    tags = validate_config(BASE, repo_tag="app:1", extra_tags=("app", "other:2")).repo_tags
    assert tags == ["app:1", "app:latest", "other:2"]


def test_store_paths_in_two_layers_and_misspelt_config_keys_are_named() -> None:
    twice = {**BASE, "store_layers": [["/gnu/store/a"], ["/gnu/store/a", "/gnu/store/b"]]}
    [warning] = validate_config(twice).warnings
    assert "/gnu/store/a is in layers 1, 2: shipped 2 times" in warning
    typo = {**BASE, "config": {"Entrypiont": ["/bin/x"]}}
    [warning] = validate_config(typo).warnings
    assert (
        "unknown key 'config'.'Entrypiont'" in warning and "did you mean 'Entrypoint'?" in warning
    )
    with pytest.raises(InputError, match=r"'config'\.'cmd'.*write it 'Cmd'"):
        validate_config({**BASE, "config": {"cmd": ["/bin/x"]}})


@pytest.mark.parametrize("epoch", ["1_000", "+5", " 7 ", "\u0661\u0662", "-3", "1e3", ""])
def test_source_date_epoch_is_an_ascii_decimal_integer(
    epoch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    with pytest.raises(InputError, match=r"SOURCE_DATE_EPOCH=.* is not a number of seconds"):
        validate_config(config_with(created="now"))


def test_a_fractional_id_is_named_as_such() -> None:
    assert error_for(config_with(uid=1.5)).endswith("'uid': must be a whole number, not 1.5")


@pytest.mark.parametrize("compressed", [False, True])
def test_an_image_archive_given_as_config_is_named(
    image: tuple[Path, BuildResult], compressed: bool, tmp_path: Path, cli_runner: CliRunner
) -> None:
    archive, _ = image
    given = archive
    if compressed:
        given = tmp_path / "image.tar.gz"
        given.write_bytes(gzip.compress(archive.read_bytes()))
    result = cli_runner.invoke(main, ["build", str(given), "-o", str(tmp_path / "o.tar")])
    assert result.exit_code == 2
    assert f"{given} is an image archive, not a build config" in result.stderr
    assert not (tmp_path / "o.tar").exists()
