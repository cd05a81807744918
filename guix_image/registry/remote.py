"""The OCI distribution protocol, for one repository: blobs and manifests.

What the spec (distribution-spec `spec.md`) says a client does, and checks:
a blob exists if HEAD answers 200; an upload is a POST that opens a session
(or mounts the blob from another repository: 201), a PATCH of the bytes and
a PUT with `?digest=` that closes it, after which the registry must report
the same digest; a manifest is PUT last, with its media type.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from .reference import Reference
from .transport import ATTEMPTS, BACKOFF, RegistryError, Response, Transport

CHUNK = 1 << 20  # bytes read from a blob's file at a time


@dataclass(frozen=True)
class BlobSource:
    """A blob to upload: its digest and size, and where its bytes are."""

    digest: str
    size: int
    path: str | None = None  # a file holding exactly the blob, from `offset`
    offset: int = 0
    data: bytes | None = None  # or the bytes themselves

    def chunks(self, stop: threading.Event | None = None) -> Iterator[bytes]:
        """Its bytes; RegistryError if `stop` is set on the way (a push given up)."""
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.size
            while left:
                if stop is not None and stop.is_set():
                    raise RegistryError("push stopped")
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise RegistryError(f"{self.path}: shorter than the blob {self.digest}")
                left -= len(chunk)
                yield chunk


class Repository:
    """One repository of a registry, through `transport`."""

    def __init__(self, transport: Transport, reference: Reference) -> None:
        self.transport = transport
        self.reference = reference
        self.name = reference.repository
        self._push = f"repository:{self.name}:pull,push"
        self.stop = threading.Event()  # set: uploads under way give up

    def blob_exists(self, digest: str) -> bool:
        response = self._request("HEAD", f"/v2/{self.name}/blobs/{digest}")
        if response.status == 200:
            return True
        if response.status == 404:
            return False
        raise self._refused(response, f"HEAD of blob {digest}")

    def mount(self, digest: str, source: str) -> bool:
        """Mount the blob from repository `source` of the same registry; whether it was."""
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        response = self._request("POST", f"/v2/{self.name}/blobs/uploads/?{query}")
        if response.status == 201:
            return True
        if response.status == 202:  # not mounted: an upload session it opened, abandoned
            self._cancel(response)
            return False
        raise self._refused(response, f"mount of {digest} from {source}")

    def upload(self, blob: BlobSource) -> None:
        """Upload the blob: POST, one PATCH of all its bytes, PUT with its digest.

        A session is not sent its bytes twice (a registry appends them): on a
        connection error or a 5xx, the whole upload starts again, unless the
        blob is there by then (a PUT whose answer was lost).
        """
        for attempt in range(ATTEMPTS):
            try:
                self._upload_once(blob)
                return
            except RegistryError as error:
                retriable = error.status is None or error.status >= 500
                if not retriable or self.stop.is_set() or attempt + 1 == ATTEMPTS:
                    raise
            time.sleep(BACKOFF * 2**attempt)
            if self.blob_exists(blob.digest):
                return

    def _upload_once(self, blob: BlobSource) -> None:
        start = f"/v2/{self.name}/blobs/uploads/"
        opened = self._request("POST", start)
        if opened.status != 202:
            raise self._refused(opened, "opening an upload")
        location = self._location(opened, start)
        patched = self.transport.request(
            "PATCH",
            location,
            scope=self._push,
            headers={"Content-Type": "application/octet-stream"},
            body=lambda: blob.chunks(self.stop),
            length=blob.size,
            retry=False,
        )
        if patched.status != 202:
            raise self._refused(patched, f"upload of {blob.digest}")
        location = self._location(patched, location)
        separator = "&" if "?" in location else "?"
        closed = self.transport.request(
            "PUT",
            f"{location}{separator}{urllib.parse.urlencode({'digest': blob.digest})}",
            scope=self._push,
            retry=False,
        )
        if closed.status != 201:
            raise self._refused(closed, f"upload of {blob.digest}")
        reported = closed.headers.get("docker-content-digest")
        if reported is not None and reported != blob.digest:
            raise RegistryError(
                f"{self.reference.host} stored blob {blob.digest} as {reported}; not retried", 400
            )

    def put_manifest(self, target: str, media_type: str, data: bytes, digest: str) -> None:
        response = self.transport.request(
            "PUT",
            f"/v2/{self.name}/manifests/{target}",
            scope=self._push,
            headers={"Content-Type": media_type},
            body=lambda: [data],
            length=len(data),
        )
        if response.status != 201:
            raise self._refused(response, f"manifest {target}")
        reported = response.headers.get("docker-content-digest")
        if reported is not None and reported != digest:
            raise RegistryError(
                f"{self.reference.host} stored manifest {digest} as {reported}; not retried"
            )

    def _request(self, method: str, path: str) -> Response:
        return self.transport.request(method, path, scope=self._push)

    def _cancel(self, response: Response) -> None:
        location = response.headers.get("location")
        if location:
            base = f"/v2/{self.name}/blobs/uploads/"
            self.transport.request("DELETE", urllib.parse.urljoin(base, location), scope=self._push)

    def _location(self, response: Response, base: str) -> str:
        """Where the upload goes on: the Location header, read relative to `base`."""
        location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{self.reference.host} gave no upload location")
        return urllib.parse.urljoin(base, location)

    def _refused(self, response: Response, what: str) -> RegistryError:
        where = f"{self.reference.host}, repository {self.name}"
        if response.status in (401, 403):
            return RegistryError(
                f"{where}: {what} refused (HTTP {response.status}): not authorised; "
                "give --username, or log in with docker or podman",
                response.status,
            )
        detail = _error_message(response.body)
        return RegistryError(
            f"{where}: {what} failed (HTTP {response.status}{': ' + detail if detail else ''})",
            response.status,
        )


def _error_message(body: bytes) -> str:
    """The registry's own words, from its JSON errors, if any."""
    import json

    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(str(e.get("message") or e.get("code")) for e in errors)[:300]
    except (ValueError, AttributeError):
        return ""
