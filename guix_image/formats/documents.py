"""The JSON documents of an archive: parsed strictly, with the checks every reader relies on."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import ArchiveError
from ..model import SHA256_PREFIX, is_sha256_digest


def parse_json(data: bytes, where: str, *, want_object: bool = False) -> Any:
    """JSON from an archive, or an ArchiveError naming `where`."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArchiveError(f"{where} is not valid JSON: {error}") from None
    if want_object and not isinstance(document, dict):
        raise ArchiveError(f"{where} is not a JSON object")
    return document


def parse_image_config(data: bytes, where: str) -> dict[str, Any]:
    """Parse an image config and check the parts every reader relies on."""
    config: dict[str, Any] = parse_json(data, where, want_object=True)
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
