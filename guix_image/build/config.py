"""The build config: the reference script's JSON, parsed and validated.

Every error names the field as a jq-style path (`'store_layers'[2][0]`) so a
user can find it; nothing here touches the file system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import strict_json
from ..errors import InputError
from ..formats.streams import detect_compression
from ..store.paths import is_inside, normalise_path

# Go's GOARCH names that container images use; anything else loads but is
# almost always a typo such as "x86_64".
KNOWN_ARCHITECTURES = frozenset(
    {"386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle"}
    | {"ppc64", "ppc64le", "riscv64", "s390x", "wasm"}
)
ARCHITECTURE_HINTS = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armhf": "arm"}

MAX_MTIME = 0o77777777777  # what an 11-digit octal tar field holds (year 2242)
DEFAULT_UID = 0
DEFAULT_GID = 0
DEFAULT_OWNER = "root"

KNOWN_FIELDS = frozenset(
    {
        "architecture",
        "config",
        "os",
        "created",
        "mtime",
        "repo_tag",
        "store_dir",
        "from_image",
        "store_layers",
        "customisation_layer",
        "uid",
        "gid",
        "uname",
        "gname",
    }
)

# The distribution "reference" grammar: [domain[:port]/]path[:tag].
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::[\w][\w.-]{{0,127}})?",
    re.ASCII,
)
MAX_ID = 2**32 - 1


@dataclass(frozen=True)
class BuildConfig:
    """A validated build request. Paths are normalised absolute strings."""

    architecture: str
    os: str
    config: dict[str, Any]
    created: datetime
    mtime: int
    repo_tag: str | None
    store_dir: str
    store_layers: tuple[tuple[str, ...], ...]
    from_image: str | None = None
    customisation_layer: str | None = None
    uid: int = DEFAULT_UID
    gid: int = DEFAULT_GID
    uname: str = DEFAULT_OWNER
    gname: str = DEFAULT_OWNER
    extra_tags: tuple[str, ...] = ()  # more names for the image (-t given again)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def repo_tags(self) -> list[str]:
        return [*([self.repo_tag] if self.repo_tag else []), *self.extra_tags]

    @property
    def created_text(self) -> str:
        """`created` as RFC 3339 in UTC, the form Docker and OCI tools write."""
        return format_time(self.created)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_config(
    text: str | bytes,
    *,
    source: str = "config",
    now: datetime | None = None,
    repo_tag: str | None = None,
    extra_tags: tuple[str, ...] = (),
) -> BuildConfig:
    """Parse and validate a config document; `repo_tag` overrides the config's."""
    if isinstance(text, bytes) and _looks_like_an_archive(text):
        raise InputError(
            f"{source} is an image archive, not a build config "
            "(to look inside it: `guix-image inspect`; as a base image: `from_image`)"
        )
    try:
        document = strict_json.loads(text)
    except strict_json.JSONRefused as error:
        if str(error).startswith("not UTF-8"):
            raise InputError(f"{source}: {error}") from None
        raise InputError(f"{source}: not valid JSON: {error}") from None
    return validate_config(
        document, source=source, now=now, repo_tag=repo_tag, extra_tags=extra_tags
    )


def _looks_like_an_archive(data: bytes) -> bool:
    """Compressed (by its magic bytes), or a tar (ustar magic where a header has it)."""
    return detect_compression(data) != "none" or data[257:262] == b"ustar"


def validate_config(
    document: Any,
    *,
    source: str = "config",
    now: datetime | None = None,
    repo_tag: str | None = None,
    extra_tags: tuple[str, ...] = (),
) -> BuildConfig:
    fields = _Fields(document, source)
    warnings = [
        f"{source}: unknown config field '{name}' ignored"
        for name in sorted(fields.names() - KNOWN_FIELDS)
    ]

    architecture = fields.string("architecture")
    if architecture not in KNOWN_ARCHITECTURES:
        hint = ARCHITECTURE_HINTS.get(architecture)
        warnings.append(
            f"{source}: config field 'architecture': {architecture!r} is not a Go/OCI "
            "architecture name" + (f"; did you mean {hint!r}?" if hint else "")
        )
    os_name = fields.string("os", default="linux")
    image_config = fields.object("config", default={})
    _check_image_config(image_config, fields)

    moment = now or _now()
    created = fields.time("created", moment)
    mtime_moment = fields.time("mtime", moment, default=created)
    mtime = int(mtime_moment.timestamp())
    if not 0 <= mtime <= MAX_MTIME:
        raise fields.error("mtime" if "mtime" in document else "created", "is outside 1970..2242")

    if repo_tag is None:
        repo_tag = fields.optional_string("repo_tag")
    repo_tag = image_name(repo_tag, f"{source}: config field 'repo_tag'") if repo_tag else None
    extra_tags = tuple(image_name(tag, f"-t {tag!r}") for tag in extra_tags)

    store_dir = fields.absolute_path("store_dir")
    store_layers = _store_layers(fields, store_dir)
    warnings.extend(_shipped_twice(store_layers, source))
    warnings.extend(_unknown_config_keys(image_config, fields))

    uid = fields.natural("uid", DEFAULT_UID)
    gid = fields.natural("gid", DEFAULT_GID)
    uname = fields.string("uname", default=DEFAULT_OWNER, allow_empty=True)
    gname = fields.string("gname", default=DEFAULT_OWNER, allow_empty=True)
    return BuildConfig(
        architecture=architecture,
        os=os_name,
        config=image_config,
        created=created,
        mtime=mtime,
        repo_tag=repo_tag,
        store_dir=store_dir,
        store_layers=store_layers,
        from_image=fields.optional_path("from_image"),
        customisation_layer=fields.optional_path("customisation_layer"),
        uid=uid,
        gid=gid,
        uname=uname,
        gname=gname,
        extra_tags=extra_tags,
        warnings=tuple(warnings),
    )


def image_name(name: str, where: str) -> str:
    """A name as loaders take it: with a tag (`latest` if none), as Docker does;
    one they would refuse is bad input before anything is built."""
    if not _REFERENCE.fullmatch(name):
        raise InputError(
            f"{where}: {name!r} is not a valid image name "
            "(lowercase name[:tag], as in 'hello:latest' or 'registry:5000/team/app:1.0')"
        )
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def _shipped_twice(layers: tuple[tuple[str, ...], ...], source: str) -> list[str]:
    seen: dict[str, list[int]] = {}
    for number, paths in enumerate(layers, 1):
        for path in dict.fromkeys(paths):
            seen.setdefault(path, []).append(number)
    return [
        f"{source}: {path} is in layers {', '.join(map(str, numbers))}: "
        f"shipped {len(numbers)} times"
        for path, numbers in seen.items()
        if len(numbers) > 1
    ]


# The fields of an image config's "config" object (OCI image spec, and Docker's).
CONFIG_KEYS = (
    "User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
    "StopSignal", "ArgsEscaped", "Healthcheck", "OnBuild", "Shell", "StopTimeout",
    "Hostname", "Domainname", "AttachStdin", "AttachStdout", "AttachStderr", "Tty",
    "OpenStdin", "StdinOnce", "Image", "NetworkDisabled", "MacAddress",
)  # fmt: skip


def _unknown_config_keys(config: dict[str, Any], fields: _Fields) -> list[str]:
    """A key loaders ignore is a typo, most likely: say which key was meant. One that
    differs from a known key by case alone is refused: Go's JSON reads it as that key,
    our readers refuse such images as ambiguous."""
    import difflib

    warnings = []
    by_case = {key.lower(): key for key in CONFIG_KEYS}
    for key in config:
        if key in CONFIG_KEYS:
            continue
        known = by_case.get(key.lower())
        if known is not None:
            raise fields.at(
                f"'config'.'{key}'", f"write it {known!r}: loaders read it as {known!r}"
            )
        close = difflib.get_close_matches(key, CONFIG_KEYS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        warnings.append(
            f"{fields.source}: unknown key 'config'.'{key}', which loaders ignore{hint}"
        )
    return warnings


def _now() -> datetime:
    # SOURCE_DATE_EPOCH is the reproducible-builds way to pin "now".
    # It is "an ASCII decimal integer" (reproducible-builds.org): int() alone
    # would also take " 7 ", "+5", "1_000" and other scripts' digits.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            if not (epoch.isascii() and epoch.isdigit()) or len(epoch) > 12:
                raise ValueError(epoch)
            return datetime.fromtimestamp(int(epoch), UTC)
        except (ValueError, OverflowError, OSError):
            raise InputError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds") from None
    return datetime.now(UTC).replace(microsecond=0)


def _store_layers(fields: _Fields, store_dir: str) -> tuple[tuple[str, ...], ...]:
    raw = fields.get("store_layers", list)
    layers: list[tuple[str, ...]] = []
    for i, layer in enumerate(raw):
        where = f"'store_layers'[{i}]"
        if not isinstance(layer, list):
            raise fields.at(where, f"must be a list of store paths, not {_type_name(layer)}")
        paths: list[str] = []
        for j, path in enumerate(layer):
            where_path = f"{where}[{j}]"
            if not isinstance(path, str) or not path:
                raise fields.at(where_path, f"must be a store path string, not {_type_name(path)}")
            if not path.startswith("/"):
                raise fields.at(where_path, f"{path} is not an absolute path")
            if "\0" in path:
                raise fields.at(where_path, f"{path!r} holds a NUL character")
            normal = normalise_path(path)
            if not is_inside(normal, store_dir):
                raise fields.at(where_path, f"{path} is not inside store_dir {store_dir}")
            paths.append(normal)
        layers.append(tuple(paths))
    return tuple(layers)


def _check_image_config(config: dict[str, Any], fields: _Fields) -> None:
    """Catch the mistakes `docker load` would report obscurely, or not at all."""
    string_lists = ("Env", "Cmd", "Entrypoint", "Shell", "OnBuild")
    for name in string_lists:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fields.at(f"'config'.'{name}'", "must be a list of strings")
    for i, entry in enumerate(config.get("Env") or []):
        if "=" not in entry or entry.startswith("="):
            raise fields.at(f"'config'.'Env'[{i}]", f"{entry!r} is not NAME=VALUE")
    for name in ("User", "WorkingDir", "StopSignal"):
        if name in config and not isinstance(config[name], str):
            raise fields.at(f"'config'.'{name}'", "must be a string")
    for name in ("Labels",):
        value = config.get(name)
        if value is not None and not (
            isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        ):
            raise fields.at(f"'config'.'{name}'", "must be an object of strings")
    for name in ("ExposedPorts", "Volumes"):
        value = config.get(name)
        if value is not None and not isinstance(value, dict):
            raise fields.at(f"'config'.'{name}'", "must be an object")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


_MISSING = object()


class _Fields:
    """Typed access to the top-level fields, with errors that name them."""

    def __init__(self, document: Any, source: str) -> None:
        if not isinstance(document, dict):
            raise InputError(
                f"{source}: the config must be a JSON object, not {_type_name(document)}"
            )
        self.document: dict[str, Any] = document
        self.source = source

    def names(self) -> set[str]:
        return set(self.document)

    def at(self, where: str, message: str) -> InputError:
        return InputError(f"{self.source}: config field {where}: {message}")

    def error(self, name: str, message: str) -> InputError:
        return self.at(f"'{name}'", message)

    def get(self, name: str, kind: type, default: Any = _MISSING) -> Any:
        value = self.document.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise self.error(name, "is missing")
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = {str: "a string", list: "a list", dict: "an object", int: "a number"}[kind]
            found = _type_name(value)
            if kind is int and isinstance(value, float):  # not "a number, not a number"
                expected, found = "a whole number", repr(value)
            raise self.error(name, f"must be {expected}, not {found}")
        return value

    def string(self, name: str, default: Any = _MISSING, allow_empty: bool = False) -> str:
        value: str = self.get(name, str, default)
        if not value and not allow_empty:
            raise self.error(name, "must not be empty")
        return value

    def optional_string(self, name: str) -> str | None:
        value: str | None = self.get(name, str, None)
        if value == "":
            raise self.error(name, "must not be empty (use null for none)")
        return value

    def optional_path(self, name: str) -> str | None:
        value = self.optional_string(name)
        if value is not None and "\0" in value:
            raise self.error(name, f"{value!r} holds a NUL character")
        if value == "-":
            raise self.error(name, "must name a file or directory, not standard input")
        return value

    def object(self, name: str, default: Any = _MISSING) -> dict[str, Any]:
        return dict(self.get(name, dict, default))

    def natural(self, name: str, default: int) -> int:
        value: int = self.get(name, int, default)
        if not 0 <= value <= MAX_ID:
            raise self.error(name, f"must be a number from 0 to {MAX_ID}, not {value}")
        return value

    def absolute_path(self, name: str) -> str:
        value = self.string(name)
        if not value.startswith("/"):
            raise self.error(name, f"{value} is not an absolute path")
        if "\0" in value:
            raise self.error(name, f"{value!r} holds a NUL character")
        return normalise_path(value)

    def time(self, name: str, now: datetime, default: Any = _MISSING) -> datetime:
        value = self.get(name, str, default)
        if isinstance(value, datetime):
            return value
        if value == "now":
            return now
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise self.error(name, f'{value!r} is not an ISO 8601 time or "now"') from None
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        try:
            moment.astimezone(UTC)
        except (OverflowError, ValueError):
            raise self.error(name, f"{value!r} is outside the years 1 to 9999 in UTC") from None
        return moment
