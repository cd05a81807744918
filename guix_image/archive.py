"""Reading image archives: find the image's manifest, config and layers.

This module knows where things are in an archive; it never extracts
anything. Member names are looked up the way loaders do (leading '/' and
'./' ignored), duplicates and escaping names are refused, and symlinked
members (which `docker save` writes for repeated layers) are followed inside
the archive only, a bounded number of times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .tarreader import (
    ArchiveError,
    TarMember,
    TarReader,
    is_climbing,
    normalise_member_name,
)
from .tarwriter import LNKTYPE, REGTYPE, SYMTYPE

MAX_MANIFEST_SIZE = 1 << 20  # as containers/image
MAX_CONFIG_SIZE = 4 << 20
MAX_MEMBERS = 1_000_000
MAX_LINK_HOPS = 16


@dataclass
class LayerRef:
    """Where one layer of an image is, and what the image says about it."""

    index: int  # from 1
    member: str  # archive member (or blob path) holding the layer
    offset: int  # of its bytes in the archive file
    size: int  # bytes as stored
    diff_id: str | None  # from the config's rootfs.diff_ids


@dataclass
class ArchiveImage:
    """One image found in an archive."""

    path: str
    format: str
    repo_tags: list[str]
    config_name: str
    config_bytes: bytes
    config: dict[str, Any]
    layers: list[LayerRef] = field(default_factory=list)


class TarIndex:
    """The members of a seekable tar archive, by normalised name."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self.members: dict[str, TarMember] = {}
        reader = TarReader(stream, name=name)
        for count, member in enumerate(reader, 1):
            if count > MAX_MEMBERS:
                raise ArchiveError(f"{name}: more than {MAX_MEMBERS} members; refusing")
            key = normalise_member_name(member.name)
            if is_climbing(member.name):
                raise ArchiveError(f"{name}: member name {member.name!r} climbs out of the archive")
            if key in self.members:
                raise ArchiveError(
                    f"{name}: duplicate member {member.name!r} "
                    f"(also {self.members[key].name!r}); loaders disagree on which one counts"
                )
            self.members[key] = member

    def find(self, name: str, what: str) -> TarMember:
        """The regular-file member `name` refers to, following links inside the archive."""
        key = normalise_member_name(name)
        if is_climbing(name):
            raise ArchiveError(f"{self.name}: {what} {name!r} climbs out of the archive")
        seen = []
        while True:
            member = self.members.get(key)
            if member is None:
                raise ArchiveError(f"{self.name}: {what} {name!r} is not in the archive")
            if member.type == REGTYPE:
                return member
            if member.type not in (SYMTYPE, LNKTYPE):
                raise ArchiveError(
                    f"{self.name}: {what} {name!r} is a {member.type_name}, not a file"
                )
            seen.append(key)
            if len(seen) > MAX_LINK_HOPS or is_climbing(member.linkname):
                raise ArchiveError(f"{self.name}: {what} {name!r} is a link that loops or escapes")
            if member.type == SYMTYPE:
                base = key.rsplit("/", 1)[0] if "/" in key else ""
                target = (
                    member.linkname
                    if member.linkname.startswith("/")
                    else f"{base}/{member.linkname}"
                )
            else:
                target = member.linkname
            if is_climbing(target.lstrip("/")):
                raise ArchiveError(
                    f"{self.name}: {what} {name!r} is a link that escapes the archive"
                )
            key = normalise_member_name(target)

    def read(self, member: TarMember, limit: int, what: str) -> bytes:
        if member.size > limit:
            raise ArchiveError(
                f"{self.name}: {what} is {member.size} bytes, over the {limit}-byte limit"
            )
        self.stream.seek(member.offset)
        data = self.stream.read(member.size)
        if len(data) != member.size:
            raise ArchiveError(f"{self.name}: truncated archive: {what} is cut short")
        return data

    def read_json(self, name: str, limit: int, what: str) -> Any:
        member = self.find(name, what)
        data = self.read(member, limit, what)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArchiveError(f"{self.name}: {what} is not valid JSON: {error}") from None


def read_docker_archive(path: str, stream: BinaryIO) -> list[ArchiveImage]:
    """Every image described by the archive's manifest.json."""
    index = TarIndex(stream, path)
    manifest = index.read_json("manifest.json", MAX_MANIFEST_SIZE, "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ArchiveError(f"{path}: manifest.json must be a non-empty list of images")
    return [_docker_image(index, path, entry, i) for i, entry in enumerate(manifest)]


def _docker_image(index: TarIndex, path: str, entry: Any, position: int) -> ArchiveImage:
    where = f"manifest.json[{position}]"
    if not isinstance(entry, dict):
        raise ArchiveError(f"{path}: {where} is not an object")
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    repo_tags = entry.get("RepoTags") or []
    if not isinstance(config_name, str):
        raise ArchiveError(f'{path}: {where} has no "Config" member name')
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise ArchiveError(f"{path}: {where}.Layers is not a list of member names")
    if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
        raise ArchiveError(f"{path}: {where}.RepoTags is not a list of strings")
    config_member = index.find(config_name, "config")
    config_bytes = index.read(config_member, MAX_CONFIG_SIZE, f"config {config_name}")
    config = parse_image_config(config_bytes, f"{path}: config {config_name}")
    diff_ids = config["rootfs"]["diff_ids"]
    if len(diff_ids) != len(layer_names):
        raise ArchiveError(
            f"{path}: {where} lists {len(layer_names)} layers but the config has "
            f"{len(diff_ids)} diff_ids"
        )
    layers = []
    for number, (name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True), 1):
        member = index.find(name, f"layer {number}")
        layers.append(LayerRef(number, member.name, member.offset, member.size, diff_id))
    return ArchiveImage(
        path=path,
        format="docker-archive",
        repo_tags=list(repo_tags),
        config_name=config_name,
        config_bytes=config_bytes,
        config=config,
        layers=layers,
    )


def parse_image_config(data: bytes, where: str) -> dict[str, Any]:
    """Parse an image config and check the parts every reader relies on."""
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArchiveError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ArchiveError(f"{where} is not a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ArchiveError(f"{where} has no rootfs.diff_ids list")
    for i, diff_id in enumerate(rootfs["diff_ids"]):
        if not _is_sha256_digest(diff_id):
            raise ArchiveError(f"{where}: rootfs.diff_ids[{i}] is not a sha256 digest: {diff_id!r}")
    if "config" in config and not isinstance(config["config"], dict | None):
        raise ArchiveError(f'{where}: "config" is not an object')
    return config


def _is_sha256_digest(value: Any) -> bool:
    if not isinstance(value, str) or not value.startswith("sha256:"):
        return False
    hex_part = value[7:]
    return len(hex_part) == 64 and all(c in "0123456789abcdef" for c in hex_part)
