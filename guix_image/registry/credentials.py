"""Credentials for a registry, where podman, skopeo and docker keep them.

Looked up in order: `$REGISTRY_AUTH_FILE`, `${XDG_RUNTIME_DIR}/containers/auth.json`
(podman login), `~/.docker/config.json` (docker login). In each, `auths`
maps a registry (`host[:port]`, or a URL naming it) to `{"auth": base64 of
"user:password"}`; docker's file may instead name a credential helper
(`credHelpers` for the registry, else `credsStore`), run as
`docker-credential-NAME get` when it is installed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .. import strict_json
from ..errors import InputError

MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @property
    def basic(self) -> str:
        """The Authorization header's value for Basic authentication."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def auth_files() -> list[Path]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path.home() / ".docker" / "config.json")
    return files


def find_credentials(host: str) -> Credentials | None:
    """The first credentials for `host` in the files users log in with, if any."""
    for path in auth_files():
        document = _read(path)
        if document is None:
            continue
        found = _from_auths(document.get("auths"), host, path)
        if found is None:
            found = _from_helper(document, host)
        if found is not None:
            return found
    return None


def _read(path: Path) -> dict[str, object] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE)
    except OSError:
        return None
    try:
        document = strict_json.loads(data)
    except strict_json.JSONRefused as error:
        raise InputError(error.describe(str(path))) from None
    return document if isinstance(document, dict) else None


def _matches(key: str, host: str) -> bool:
    if key == host:
        return True
    parsed = urllib.parse.urlsplit(key if "://" in key else f"//{key}")
    return parsed.netloc == host


def _from_auths(auths: object, host: str, path: Path) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(key, str) or not _matches(key, host) or not isinstance(entry, dict):
            continue
        encoded = entry.get("auth")
        if not isinstance(encoded, str) or not encoded:
            continue
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InputError(
                f"{path}: the credentials for {key} are not base64 of user:password"
            ) from None
        return Credentials(username, password)
    return None


def _from_helper(document: dict[str, object], host: str) -> Credentials | None:
    helpers = document.get("credHelpers")
    helper = helpers.get(host) if isinstance(helpers, dict) else None
    if helper is None:
        helper = document.get("credsStore")
    if not isinstance(helper, str) or not helper:
        return None
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        return None
    try:
        answer = subprocess.run(
            [program, "get"], input=host.encode(), capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answer.returncode != 0:
        return None
    try:
        secret = json.loads(answer.stdout)
    except ValueError:
        return None
    if not isinstance(secret, dict):
        return None
    username, password = secret.get("Username"), secret.get("Secret")
    if isinstance(username, str) and isinstance(password, str):
        return Credentials(username, password)
    return None
