"""A real registry for the tests: Debian's docker-registry (the CNCF distribution
registry) on a free loopback port, its storage in a temporary directory."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
def running_registry(directory: Path, users: dict[str, str] | None = None) -> Iterator[Registry]:
    """A registry on a free loopback port; with `users` (name: password), behind TLS
    (see make_certificates) with htpasswd Basic authentication."""
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
