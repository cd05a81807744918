"""The JSON documents of an archive: parsed strictly, with the checks every reader relies on."""

from __future__ import annotations

import re
from typing import Any

from .. import strict_json
from ..errors import ArchiveError
from ..model import SHA256_PREFIX, is_sha256_digest


def parse_json(data: bytes, where: str, *, want_object: bool = False) -> Any:
    """JSON from an archive, read as loaders read it (see strict_json), or an
    ArchiveError naming `where`."""
    try:
        document = strict_json.loads(data)
    except strict_json.JSONRefused as error:
        raise ArchiveError(error.describe(where)) from None
    if want_object and not isinstance(document, dict):
        raise ArchiveError(f"{where} is not a JSON object")
    return document


# The fields loaders read from each document, as Go's structs name them. Go
# matches keys to them case-insensitively: a key that is one of them but for
# case ("cmd") is what docker runs, and would be missed by a reader that
# matches exactly, so it is refused.
IMAGE_CONFIG_KEYS = frozenset(
    {"architecture", "os", "os.version", "os.features", "variant", "config", "rootfs"}
    | {"history", "created", "author", "container", "container_config", "docker_version"}
)
CONTAINER_CONFIG_KEYS = frozenset(
    {"User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels"}
    | {"StopSignal", "ArgsEscaped", "Healthcheck", "OnBuild", "Shell", "StopTimeout"}
    | {"Hostname", "Domainname", "AttachStdin", "AttachStdout", "AttachStderr", "Tty"}
    | {"OpenStdin", "StdinOnce", "Image", "NetworkDisabled", "MacAddress"}
)
ROOTFS_KEYS = frozenset({"type", "diff_ids"})
HISTORY_KEYS = frozenset({"created", "created_by", "author", "comment", "empty_layer"})
DOCKER_MANIFEST_KEYS = frozenset({"Config", "RepoTags", "Layers", "Parent", "LayerSources"})
OCI_MANIFEST_KEYS = frozenset(
    {"schemaVersion", "mediaType", "config", "layers", "manifests", "annotations", "subject"}
    | {"artifactType"}
)
DESCRIPTOR_KEYS = frozenset(
    {"mediaType", "digest", "size", "urls", "annotations", "platform", "artifactType", "data"}
)


def check_key_case(document: Any, known: frozenset[str], where: str) -> None:
    """Refuse a key of `document` that is one of `known` but for case (see above)."""
    if not isinstance(document, dict):
        return
    folded = _folded(known)
    for key in document:
        if key not in known and key.casefold() in folded:
            raise ArchiveError(
                f"{where}: key {key!r} is read by loaders as {folded[key.casefold()]!r}; "
                "readers disagree on it"
            )


def _folded(known: frozenset[str]) -> dict[str, str]:
    if known not in _FOLDED:
        _FOLDED[known] = {name.casefold(): name for name in known}
    return _FOLDED[known]


_FOLDED: dict[frozenset[str], dict[str, str]] = {}


def parse_image_config(data: bytes, where: str) -> dict[str, Any]:
    """Parse an image config and check the parts every reader relies on."""
    config: dict[str, Any] = parse_json(data, where, want_object=True)
    check_key_case(config, IMAGE_CONFIG_KEYS, where)
    check_key_case(config.get("config"), CONTAINER_CONFIG_KEYS, f"{where}: config")
    check_key_case(config.get("rootfs"), ROOTFS_KEYS, f"{where}: rootfs")
    for entry in config.get("history") or [] if isinstance(config.get("history"), list) else []:
        check_key_case(entry, HISTORY_KEYS, f"{where}: history")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ArchiveError(f"{where} has no rootfs.diff_ids list")
    for i, diff_id in enumerate(rootfs["diff_ids"]):
        if not is_sha256_digest(diff_id):
            raise ArchiveError(f"{where}: rootfs.diff_ids[{i}] is not a sha256 digest: {diff_id!r}")
    settings = config.get("config")
    if settings is not None and not isinstance(settings, dict):
        raise ArchiveError(f'{where}: "config" is not an object')
    for key in ("Env", "Cmd", "Entrypoint"):
        value = (settings or {}).get(key)
        if value is not None and not _strings(value):
            raise ArchiveError(f"{where}: config.{key} is not a list of strings")
    # Strings in loaders' structs: anything else fails `docker load`.
    for key, value in [
        *((key, config.get(key)) for key in ("architecture", "os", "variant", "author")),
        *((f"config.{key}", (settings or {}).get(key)) for key in ("User", "WorkingDir")),
    ]:
        if value is not None and not isinstance(value, str):
            raise ArchiveError(f"{where}: {key} is not a string")
    history = config.get("history")
    if history is not None and not (
        isinstance(history, list)
        and all(
            isinstance(entry, dict)
            and all(isinstance(entry.get(k, ""), str) for k in ("created", "created_by", "comment"))
            for entry in history
        )
    ):
        raise ArchiveError(f"{where}: history is not a list of entries with text fields")
    return config


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def digest_in_name(location: str) -> str | None:
    """The digest a member's name claims, as in `<hex>.json` or `blobs/sha256/<hex>`."""
    match = re.search(r"(?:^|/)(?:sha256/)?([0-9a-f]{64})(?:\.json)?\Z", location)
    return SHA256_PREFIX + match.group(1) if match else None
