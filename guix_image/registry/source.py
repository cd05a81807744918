"""A registry as the readers read archives: `docker://HOST/NAME[:TAG|@DIGEST]`.

The readers walk OCI layouts (formats/oci_layout.py); a registry is made to
look like one: `index.json` names the manifest the reference resolves to,
and `blobs/sha256/<hex>` are fetched as manifests (what the walk reads as a
manifest or index) or blobs (configs and layers). Manifests and configs are
fetched whole, layers only when a command reads them, streamed. Nothing a
registry claims is taken for true: the readers check every digest, as for
any archive.
"""

from __future__ import annotations

import http.client
import io
import urllib.parse
from typing import Any, BinaryIO, cast

from ..errors import ArchiveError
from ..formats.limits import MAX_MANIFEST_SIZE
from ..formats.oci_layout import INDEX_TYPES, MANIFEST_TYPES, REF_NAME
from ..formats.sources import Source
from ..model import SHA256_PREFIX, canonical_json, sha256_digest
from .reference import Reference
from .transport import RegistryError, Transport

# What we read, in order of preference (the spec's Accept negotiation).
ACCEPT = ", ".join(sorted(MANIFEST_TYPES | INDEX_TYPES))
_BLOBS = "blobs/sha256/"
MAX_REDIRECTS = 5


class RegistrySource(Source):
    """The image `reference` names, in its registry, through `transport`."""

    kind = "registry"

    def __init__(self, transport: Transport, reference: Reference) -> None:
        self.transport = transport
        self.reference = reference
        self.name = f"docker://{reference}"
        self._scope = f"repository:{reference.repository}:pull"
        self._manifests: dict[str, bytes] = {}
        data, media_type = self._get_manifest(reference.target)
        digest = sha256_digest(data)
        if reference.digest is not None and reference.digest != digest:
            raise ArchiveError(f"{self.name}: the registry's manifest has digest {digest}")
        annotations = {REF_NAME: str(reference)} if reference.tag else None
        descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        self._index = canonical_json({"schemaVersion": 2, "manifests": [descriptor]})

    # -- what the readers ask for ---------------------------------------------------

    def exists(self, location: str) -> bool:
        return location == "index.json" or location.startswith(_BLOBS)

    def read_bytes(self, location: str, limit: int, what: str) -> bytes:
        if location == "index.json":
            return self._index
        digest = self._digest(location)
        if what == "manifest":
            return self._get_manifest(digest)[0]
        with self._stream(digest) as answer:
            data = answer.read(limit + 1)
        if len(data) > limit:
            raise ArchiveError(f"{self.name}: {what} {digest} is over the {limit}-byte limit")
        return data

    def size_of(self, location: str) -> int:
        digest = self._digest(location)
        if digest in self._manifests:
            return len(self._manifests[digest])
        response = self.transport.request(
            "HEAD", f"/v2/{self.reference.repository}/blobs/{digest}", scope=self._scope
        )
        length = response.headers.get("content-length")
        if response.status != 200 or length is None or not length.isdigit():
            raise ArchiveError(f"{self.name}: blob {digest} is missing (HTTP {response.status})")
        return int(length)

    def open_blob(self, location: str) -> BinaryIO:
        return cast(BinaryIO, self._stream(self._digest(location)))

    # -- the registry -------------------------------------------------------------------

    def _digest(self, location: str) -> str:
        if not location.startswith(_BLOBS):
            raise ArchiveError(f"{self.name}: no {location!r} in a registry")
        return SHA256_PREFIX + location.removeprefix(_BLOBS)

    def _get_manifest(self, target: str) -> tuple[bytes, str]:
        if target in self._manifests:
            return self._manifests[target], ""
        path = f"/v2/{self.reference.repository}/manifests/{target}"
        response = self.transport.request(
            "GET", path, scope=self._scope, headers={"Accept": ACCEPT}
        )
        if response.status != 200:
            raise ArchiveError(
                f"{self.name}: no manifest {target} (HTTP {response.status})"
                if response.status == 404
                else f"{self.name}: manifest {target} refused (HTTP {response.status})"
            )
        if len(response.body) > MAX_MANIFEST_SIZE:
            raise ArchiveError(f"{self.name}: manifest {target} is over {MAX_MANIFEST_SIZE} bytes")
        self._manifests[sha256_digest(response.body)] = response.body
        return response.body, response.headers.get("content-type", "").split(";")[0]

    def _stream(self, digest: str) -> _Answer:
        """GET of a blob, streamed, following the redirects registries use to
        send blobs from their storage (credentials go to the registry alone)."""
        url = f"/v2/{self.reference.repository}/blobs/{digest}"
        for _ in range(MAX_REDIRECTS):
            answer = self.transport.open_stream(url, scope=self._scope)
            if answer.status in (301, 302, 303, 307, 308):
                location = answer.getheader("location") or ""
                answer.close()
                url = urllib.parse.urljoin(url, location)
                continue
            if answer.status != 200:
                answer.close()
                raise ArchiveError(f"{self.name}: blob {digest} refused (HTTP {answer.status})")
            return _Answer(answer)
        raise RegistryError(f"{self.name}: blob {digest}: more than {MAX_REDIRECTS} redirects")


class _Answer(io.RawIOBase):
    """A streamed answer as a raw binary file, closing its connection when closed."""

    def __init__(self, answer: http.client.HTTPResponse) -> None:
        super().__init__()
        self._answer = answer

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._answer.readinto(buffer)
        except (OSError, http.client.HTTPException) as error:
            raise RegistryError(f"reading from the registry failed: {error}") from None

    def close(self) -> None:
        if not self.closed:
            self._answer.close()
        super().close()
