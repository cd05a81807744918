"""HTTP to one registry: connections, TLS, authentication challenges, retries.

Kept apart from the protocol (remote.py), as go-containerregistry keeps
`transport` apart from `remote`. One connection per thread (http.client's
are not shared). A request is retried, with backoff, on a connection error
or a 5xx answer, a bounded number of times; its body is a function that
gives the bytes again for each attempt. A 401 is answered as its
`WWW-Authenticate` challenge says: Basic with the credentials given, or a
Bearer token fetched from the realm for the scope asked (anonymous when no
credentials are given).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import OperationError
from .credentials import Credentials, find_credentials

ATTEMPTS = 4
BACKOFF = 0.25  # seconds before the second attempt, doubled each time
TIMEOUT = 60.0
MAX_BODY = 16 << 20  # of an answer read into memory (manifests, errors, tokens)

# A request body: a function giving its chunks, afresh for each attempt.
Body = Callable[[], Iterable[bytes]]


class RegistryError(OperationError):
    """The registry refused, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Transport:
    """Requests to the registry at `host` ("name[:port]")."""

    host: str
    # https, or plain http; None: https if the registry speaks it, else http
    # (for a registry on this machine, as docker does for insecure registries).
    secure: bool | None = True
    verify: bool = True  # check the registry's certificate
    ca_file: str | None = None
    credentials: Credentials | None = None
    attempts: int = ATTEMPTS
    _local: threading.local = field(default_factory=threading.local)
    _tokens: dict[str, str] = field(default_factory=dict)  # by scope
    _lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0  # counted, for tests and the report

    def request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: Body | None = None,
        length: int | None = None,
        retry: bool = True,
    ) -> Response:
        """`method` on `url` (a path, or a URL the registry gave), with the
        authorisation `scope` needs; retried as the module says, unless `retry`
        is False (a request that must not be sent twice: its caller retries)."""
        attempts = self.attempts if retry else 1
        for attempt in range(attempts):
            try:
                response = self._once(method, url, scope, headers or {}, body, length)
                if response.status == 401 and self._answer_challenge(response, scope):
                    response = self._once(method, url, scope, headers or {}, body, length)
            except (OSError, http.client.HTTPException) as error:
                self._drop_connection()
                if isinstance(error, ssl.SSLCertVerificationError):
                    raise self._unverified(error) from None
                if attempt + 1 == attempts:
                    raise RegistryError(f"{self.host}: {method} failed: {error}") from None
            else:
                if response.status < 500 or attempt + 1 == attempts:
                    return response
            time.sleep(BACKOFF * 2**attempt)
        raise AssertionError("unreachable")

    def open_stream(self, url: str, *, scope: str) -> http.client.HTTPResponse:
        """GET `url` on a connection of its own, its answer left unread (the
        caller reads and closes it). Credentials go to this registry only: a
        URL on another host (storage a registry redirects to) gets none."""
        self._connection()  # decides http or https first
        parsed = urllib.parse.urlsplit(url)
        ours = not parsed.netloc or _same_host(parsed, self.host, bool(self.secure))
        secure = self.secure if ours else parsed.scheme == "https"
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        for attempt in range(2):
            headers = {}
            if ours and scope in self._tokens:
                headers["Authorization"] = self._tokens[scope]
            connection = self._open(secure, self.host if ours else parsed.netloc)
            try:
                connection.request("GET", path, headers=headers)
                answer = connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise RegistryError(f"{self.host}: GET failed: {error}") from None
            with self._lock:
                self.requests += 1
            if answer.status == 401 and ours and attempt == 0:
                response = Response(401, {k.lower(): v for k, v in answer.getheaders()}, b"")
                answer.close()
                if self._answer_challenge(response, scope):
                    continue
            return answer
        raise AssertionError("unreachable")

    # -- one attempt ----------------------------------------------------------------

    def _once(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str],
        body: Body | None,
        length: int | None,
    ) -> Response:
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc and not _same_host(parsed, self.host, bool(self.secure)):
            # Our credentials go to this registry only.
            raise RegistryError(f"{self.host} sent us to another host: {parsed.netloc}")
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        sent = dict(headers)
        authorisation = self._tokens.get(scope)
        if authorisation:
            sent["Authorization"] = authorisation
        if body is not None and length is not None:
            sent["Content-Length"] = str(length)
        elif body is None and method in ("PUT", "POST", "PATCH"):
            sent["Content-Length"] = "0"
        connection = self._connection()
        with self._lock:
            self.requests += 1
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in sent.items():
            connection.putheader(name, value)
        connection.endheaders()
        if body is not None:
            for chunk in body():
                connection.send(chunk)
        answer = connection.getresponse()
        data = answer.read(MAX_BODY + 1)  # nothing for a HEAD, but it ends the answer
        if len(data) > MAX_BODY:
            self._drop_connection()
            raise RegistryError(f"{self.host}: an answer over {MAX_BODY} bytes")
        headers_in = {name.lower(): value for name, value in answer.getheaders()}
        if answer.will_close:
            self._drop_connection()
        return Response(answer.status, headers_in, data)

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            with self._lock:
                if self.secure is None:
                    self.secure = self._speaks_tls()
            connection = self._open(self.secure, self.host)
            self._local.connection = connection
        return connection

    def _unverified(self, error: ssl.SSLCertVerificationError) -> RegistryError:
        return RegistryError(
            f"{self.host}: its TLS certificate does not verify ({error.verify_message}); "
            "give --cert-dir with its CA, or --tls-verify=false"
        )

    def _speaks_tls(self) -> bool:
        """Whether the registry answers TLS (a certificate that fails to verify is
        an error, not a reason to fall back to plain HTTP)."""
        probe = self._open(True, self.host)
        try:
            probe.request("GET", "/v2/")
            probe.getresponse().read(MAX_BODY)
        except ssl.SSLCertVerificationError as error:
            raise self._unverified(error) from None
        except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected):
            return False  # it speaks plain HTTP
        except OSError as error:
            raise RegistryError(f"{self.host}: cannot connect: {error}") from None
        finally:
            probe.close()
        return True

    def _open(self, secure: bool | None, netloc: str) -> http.client.HTTPConnection:
        if not secure:
            return http.client.HTTPConnection(netloc, timeout=TIMEOUT)
        context = ssl.create_default_context()  # the system's CAs, and --cert-dir's
        if self.ca_file is not None:
            context.load_verify_locations(self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=context)

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    # -- authorisation ------------------------------------------------------------------

    def _answer_challenge(self, response: Response, scope: str) -> bool:
        """Get what the challenge asks for; whether there is something to try again with."""
        challenge = response.headers.get("www-authenticate", "")
        kind, _, rest = challenge.partition(" ")
        if kind.lower() == "basic":
            if self.credentials is None:
                return False
            self._tokens[scope] = self.credentials.basic
            return True
        if kind.lower() != "bearer":
            return False
        parameters = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        realm = parameters.get("realm")
        if not realm:
            return False
        # The challenge's scopes: those asked, and perhaps more (a mount's source).
        scopes = parameters.get("scope", scope).split() or [scope]
        token = self._token(realm, parameters.get("service"), scopes)
        self._tokens[scope] = "Bearer " + token
        return True

    def _token(self, realm: str, service: str | None, scopes: list[str]) -> str:
        url = urllib.parse.urlsplit(realm)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise RegistryError(f"{self.host}: its token realm {realm!r} is not a URL")
        if url.scheme == "http" and self.secure and self.credentials is not None:
            raise RegistryError(
                f"{self.host}: its token realm {realm} is plain HTTP; "
                "refusing to send the password there"
            )
        query = urllib.parse.parse_qsl(url.query) + [("scope", s) for s in scopes]
        if service:
            query.append(("service", service))
        scope = " ".join(scopes)
        connection = self._open(url.scheme == "https", url.netloc)
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic
        path = (url.path or "/") + "?" + urllib.parse.urlencode(query)
        try:
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            data = answer.read(MAX_BODY)
        except (OSError, http.client.HTTPException) as error:
            raise RegistryError(f"{realm}: cannot get a token: {error}") from None
        finally:
            connection.close()
        if answer.status != 200:
            raise RegistryError(
                f"{realm} refused a token for {scope} (HTTP {answer.status})", answer.status
            )
        try:
            document = json.loads(data)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{realm} gave no token for {scope}")
        return token


def connect(
    reference: Any,
    *,
    insecure: bool = False,
    verify: bool = True,
    ca_file: str | None = None,
    credentials: Credentials | None = None,
) -> Transport:
    """A transport to `reference`'s registry: HTTPS, checked; on this machine (or
    `insecure`), plain HTTP if that is all it speaks. Without `credentials`,
    those podman login or docker login kept, if any (see credentials.py)."""
    if credentials is None:
        credentials = find_credentials(reference.host)
    secure = None if insecure or reference.loopback else True
    return Transport(
        reference.host, secure=secure, verify=verify, ca_file=ca_file, credentials=credentials
    )


def _same_host(url: urllib.parse.SplitResult, host: str, secure: bool) -> bool:
    """Whether `url` names the registry at `host` (case and default ports aside)."""
    default = 443 if (url.scheme or ("https" if secure else "http")) == "https" else 80
    ours = urllib.parse.urlsplit(f"//{host}")
    try:
        return (url.hostname, url.port or default) == (ours.hostname, ours.port or default)
    except ValueError:
        return False
