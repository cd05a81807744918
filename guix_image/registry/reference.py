"""Image references in a registry: `[docker://]host[:port]/name[:tag|@digest]`."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from ..errors import InputError
from ..model import is_sha256_digest

# The distribution spec's grammar: path components of lowercase letters and
# digits with separators, a tag of up to 128 word characters, dots and dashes.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    """A repository in a registry, and a tag or digest in it."""

    host: str  # with its port, if given
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """What a manifest is put or got under: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"

    @property
    def loopback(self) -> bool:
        """Whether the registry is on this machine (plain HTTP is then allowed)."""
        host = urllib.parse.urlsplit(f"//{self.host}").hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _port_ok(host: str) -> bool:
    try:
        port = urllib.parse.urlsplit(f"//{host}").port
    except ValueError:
        return False
    return port is None or port > 0


def parse_reference(text: str) -> Reference:
    """`[docker://]host[:port]/name[:tag|@digest]`; InputError naming what is wrong."""
    rest = text.removeprefix("docker://")
    host, slash, path = rest.partition("/")
    host = host.lower()  # host names are read without case
    # As docker reads names: the first component is a registry only if it has
    # a dot or a port, or is localhost; there is no default registry here.
    registry = "." in host or ":" in host or host == "localhost"
    if not slash or not _HOST.fullmatch(host) or not registry or not _port_ok(host):
        raise InputError(
            f"{text!r}: give the registry and the name, as host[:port]/name[:tag]"
            " (for example localhost:5000/app:1.0)"
        )
    digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not is_sha256_digest(digest):
            raise InputError(f"{text!r}: {digest!r} is not a sha256 digest")
    tag = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        path, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise InputError(f"{text!r}: {tag!r} is not a valid tag")
    if not _NAME.fullmatch(path):
        raise InputError(
            f"{text!r}: {path!r} is not a repository name (lowercase letters, digits, "
            "separators . _ - and /)"
        )
    return Reference(host, path, tag, digest)
