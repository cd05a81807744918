"""A real registry for the tests: Debian's docker-registry (the CNCF distribution
registry) on a free loopback port, its storage in a temporary directory."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tools import require

CONFIG = """\
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: guix-image-tests
"""
TLS = """\
  tls:
    certificate: {directory}/server.crt
    key: {directory}/server.key
auth:
  htpasswd:
    realm: guix-image-tests
    path: {directory}/htpasswd
"""
# One access-log line per request: "METHOD /v2/... HTTP/1.1" STATUS
_ACCESS = re.compile(r'"([A-Z]+) (/v2/\S*) HTTP/1\.1" (\d{3})')


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    log: Path
    process: subprocess.Popen[bytes]

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request it has answered."""
        text = self.log.read_text(errors="replace")
        return [(m, p, int(s)) for m, p, s in _ACCESS.findall(text)]

    def uploads(self) -> list[str]:
        """The blobs uploaded: the digests of the PUTs that closed an upload."""
        found = []
        for method, path, status in self.requests():
            digest = re.search(r"digest=(sha256(?:%3A|:)[0-9a-f]{64})", path)
            if method == "PUT" and "/blobs/uploads/" in path and status == 201 and digest:
                found.append(digest.group(1).replace("%3A", ":"))
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificates(directory: Path) -> Path:
    """A test CA (`ca.crt`) and a certificate for 127.0.0.1 signed by it; the CA's path."""
    require("openssl")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=guix-image test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    return directory / "ca.crt"


@contextmanager
def running_registry(
    directory: Path, users: dict[str, str] | None = None, token_host: str | None = None
) -> Iterator[Registry]:
    """A registry on a free loopback port; with `users` (name: password), behind TLS
    (see make_certificates) with htpasswd Basic authentication; with `token_host`,
    with token authentication by the TokenService there (made in `directory`)."""
    require("docker-registry")
    port = free_port()
    config = directory / "config.yml"
    text = CONFIG.format(root=directory / "storage", port=port)
    if users is not None:
        import bcrypt

        make_certificates(directory)
        lines = [
            f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}"
            for name, password in users.items()
        ]
        (directory / "htpasswd").write_text("\n".join(lines) + "\n")
        text += TLS.format(directory=directory)
    if token_host is not None:
        text += TOKEN_AUTH.format(token_host=token_host, directory=directory)
    config.write_text(text)
    log = directory / "registry.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    message = f"docker-registry did not start:\n{log.read_text()}"
                    raise RuntimeError(message) from None
                time.sleep(0.1)
        yield registry
    finally:
        registry.stop()


def serve(handler: type[Any]) -> tuple[Any, str]:
    """An HTTP server of `handler` on a free loopback port, in a thread; and its host."""
    import http.server
    import threading

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a request the test broke on purpose: no traceback in its output

    server = Quiet(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def stop(server: Any) -> None:
    server.shutdown()
    server.server_close()


class FailingProxy:
    """A proxy in front of a registry that forwards every request, until `fail`
    says one must fail: it then answers 503 to it and all that follow (a
    registry gone bad mid-push). `seen` lists (method, path) of all requests."""

    def __init__(self, registry: Registry, fail: Callable[[str, str], bool]) -> None:
        import http.client
        import http.server

        self.seen: list[tuple[str, str]] = []
        self.failing = False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                proxy.seen.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.failing or fail(self.command, self.path):
                    proxy.failing = True
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection(registry.host, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        # As a registry behind a proxy says: where to go next, here.
                        self.send_header(name, value.replace(registry.host, proxy.host))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server, self.host = serve(Handler)

    def close(self) -> None:
        stop(self.server)


TOKEN_AUTH = """\
auth:
  token:
    realm: http://{token_host}/token
    service: guix-image-tests
    issuer: guix-image-test-issuer
    rootcertbundle: {directory}/signing.crt
"""


class TokenService:
    """A token service for a registry's `auth: token`: it answers GET /token with
    a JWT (RS256, signed by `openssl dgst` with a test key whose certificate the
    registry trusts) granting the scope asked for, to `users` (Basic) only, or to
    anyone if `users` is None. `granted` lists the scopes it granted."""

    def __init__(self, directory: Path, users: dict[str, str] | None) -> None:
        import base64
        import http.server
        import json

        require("openssl")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "signing.key",
             "-out", "signing.crt", "-days", "2", "-subj", "/CN=guix-image token signer"],
            cwd=directory, check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", "signing.crt", "-outform", "DER"],
            cwd=directory, check=True, capture_output=True,
        ).stdout  # fmt: skip
        self.granted: list[str] = []
        service = self

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        def token(subject: str, scopes: list[str]) -> str:
            access = []
            for scope in scopes:
                _, name, actions = scope.split(":")
                access.append({"type": "repository", "name": name, "actions": actions.split(",")})
            now = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
            claims = {
                "iss": "guix-image-test-issuer", "sub": subject, "aud": "guix-image-tests",
                "exp": now + 600, "nbf": now - 10, "iat": now, "jti": f"{now}-{subject}",
                "access": access,
            }  # fmt: skip
            signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
            signature = subprocess.run(
                ["openssl", "dgst", "-sha256", "-sign", str(directory / "signing.key")],
                input=signed.encode(), check=True, capture_output=True,
            ).stdout  # fmt: skip
            return f"{signed}.{b64(signature)}"

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                import urllib.parse

                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scopes = query.get("scope", [])
                subject = ""
                if users is not None:
                    given = self.headers.get("Authorization", "")
                    pair = base64.b64decode(given.removeprefix("Basic ")).decode() if given else ""
                    subject, _, password = pair.partition(":")
                    if users.get(subject) != password:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                service.granted.extend(scopes)
                body = json.dumps({"token": token(subject, scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server, self.host = serve(Handler)

    def close(self) -> None:
        stop(self.server)
