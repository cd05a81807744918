"""A small example store, generated on the spot, for `build --example`.

The store lives in a temporary directory used as a chroot store root, so the
image holds ordinary `/gnu/store/...` paths and is byte-for-byte the same on
every machine.
"""

from __future__ import annotations

import hashlib
import os
import struct
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


GREETING = b"Hello, world!\n"
ARCHITECTURES = ("amd64", "arm64")  # those the example has a program for


def hello_program(architecture: str, message: bytes = GREETING) -> bytes:
    """A static Linux executable that prints `message`: no shell, no libc, so that
    the example image runs with nothing else in it (and is the same bytes on every
    machine of that architecture)."""
    if architecture == "amd64":
        machine = 62
        code = (
            b"\xb8\x01\x00\x00\x00"  # mov eax, 1 (write)
            b"\xbf\x01\x00\x00\x00"  # mov edi, 1 (standard output)
            b"\x48\x8d\x35"
            + struct.pack("<i", 16)  # lea rsi, [rip + 16]: the message
            + b"\xba"
            + struct.pack("<I", len(message))  # mov edx, length
            + b"\x0f\x05"  # syscall
            b"\xb8\x3c\x00\x00\x00"  # mov eax, 60 (exit)
            b"\x31\xff"  # xor edi, edi
            b"\x0f\x05"  # syscall
        )
    elif architecture == "arm64":
        machine = 183
        words = (
            0xD2800020,  # mov x0, #1
            0x100000E1,  # adr x1, .+28: the message
            0xD2800002 | (len(message) << 5),  # mov x2, #length
            0xD2800808,  # mov x8, #64 (write)
            0xD4000001,  # svc #0
            0xD2800000,  # mov x0, #0
            0xD2800BA8,  # mov x8, #93 (exit)
            0xD4000001,  # svc #0
        )
        code = b"".join(struct.pack("<I", word) for word in words)
    else:
        raise ValueError(f"no example program for {architecture}")
    base, headers = 0x400000, 64 + 56
    size = headers + len(code) + len(message)
    elf = (
        b"\x7fELF\x02\x01\x01" + bytes(9)  # 64-bit, little-endian, version 1
        + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0)
        + struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # one R+X segment
    )  # fmt: skip
    return elf + code + message


def _write(root: str, path: str, content: str, mode: int = 0o444) -> None:
    full = root + path
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
        f.write(content)
    os.chmod(full, mode)


def make_example_store(root: str, architecture: str = "amd64") -> dict[str, Any]:
    """Create the example store under `root` and return the build config for it,
    its program built for `architecture` (amd64 or arm64)."""
    for language, text in {
        "en": "Hello, world!\n",
        "fr": "Bonjour, le monde !\n",
        "nl": "Hallo, wereld!\n",
    }.items():
        _write(root, f"{GREETINGS}/share/greetings/{language}.txt", text)
    os.makedirs(root + f"{GREETINGS}/share/empty")

    program = root + f"{HELLO}/bin/hello"
    os.makedirs(os.path.dirname(program), exist_ok=True)
    with open(program, "wb") as f:
        f.write(hello_program(architecture))
    os.chmod(program, 0o555)
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
        "architecture": architecture,
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
