"""A small example store, generated on the spot, for `build --example`.

The store lives in a temporary directory used as a chroot store root, so the
image holds ordinary `/gnu/store/...` paths and is byte-for-byte the same on
every machine.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

STORE_DIR = "/gnu/store"
_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base32 alphabet


def store_path(name: str) -> str:
    """A store path with a fake but stable 32-character hash part."""
    digest = hashlib.sha256(name.encode()).digest()
    hash_part = "".join(_BASE32[b % 32] for b in digest[:32])
    return f"{STORE_DIR}/{hash_part}-{name}"


GREETINGS = store_path("greetings-1.0")
HELLO = store_path("hello-2.12")
PROFILE = store_path("profile")
MOTD = store_path("motd")


def _write(root: str, path: str, content: str, mode: int = 0o444) -> None:
    full = root + path
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
        f.write(content)
    os.chmod(full, mode)


def make_example_store(root: str) -> dict[str, Any]:
    """Create the example store under `root` and return the build config for it."""
    for language, text in {
        "en": "Hello, world!\n",
        "fr": "Bonjour, le monde !\n",
        "nl": "Hallo, wereld!\n",
    }.items():
        _write(root, f"{GREETINGS}/share/greetings/{language}.txt", text)
    os.makedirs(root + f"{GREETINGS}/share/empty")

    _write(
        root,
        f"{HELLO}/bin/hello",
        f'#!/bin/sh\nexec cat "{GREETINGS}/share/greetings/${{GREETING_LANGUAGE:-en}}.txt"\n',
        0o555,
    )
    os.symlink("hello", root + f"{HELLO}/bin/hi")
    _write(root, f"{HELLO}/share/doc/hello/README", "hello: prints a greeting.\n")
    # A hard link: the image holds it as a second regular file.
    os.link(root + f"{HELLO}/share/doc/hello/README", root + f"{HELLO}/share/doc/hello/README.txt")

    os.makedirs(root + PROFILE)
    os.symlink(f"{HELLO}/bin", root + f"{PROFILE}/bin")
    _write(
        root, MOTD, "Built by guix-image from an example store.\n"
    )  # a store path that is a file

    for directory in (GREETINGS, HELLO, PROFILE):
        for dirpath, dirnames, _ in os.walk(root + directory):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o555)
        os.chmod(root + directory, 0o555)

    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:01Z",
        "repo_tag": "guix-image-example:latest",
        "store_dir": STORE_DIR,
        "from_image": None,
        "store_layers": [[GREETINGS], [HELLO], [PROFILE, MOTD]],
        "customisation_layer": None,
        "config": {
            "Cmd": [f"{PROFILE}/bin/hello"],
            "Env": [f"PATH={PROFILE}/bin"],
            "Labels": {"org.opencontainers.image.description": "guix-image example"},
        },
    }


def remove_example_store(root: str) -> None:
    """Make the read-only tree writable again so it can be deleted."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
