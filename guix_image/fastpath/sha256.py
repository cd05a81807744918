"""SHA-256 that stops at a 64-byte boundary and resumes elsewhere, from checkpoints.

A layer's digest is one chain of SHA-256 compressions, so `hashlib` computes
it on one core, at about 2 GB/s: while a store's large files stream, that
chain is what a build waits for. When a layer is first built, the chain's
state is recorded every CHECKPOINT_INTERVAL bytes (its checkpoints) and
cached with its digest. A rebuild then hashes the stretches between
checkpoints on several cores at once and still proves the digest of the
bytes it wrote: each stretch, started from the checkpoint before it, must
end exactly at the checkpoint after it, and the last one gives the digest.
A stretch that misses its checkpoint means the bytes differ from the cached
layer's.

`hashlib` cannot export or import a hash's state, so this calls the same
OpenSSL functions through ctypes. Where they cannot be loaded, or fail the
self-test, `resumable()` is False and digests are computed in one chain,
as before.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import Any

CHECKPOINT_INTERVAL = 4 << 20  # bytes of a layer between two checkpoints
STATE_SIZE = 32  # a checkpoint: the eight 32-bit chaining values, big-endian
_STATE = struct.Struct(">8I")
_LIBRARIES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so")


def checkpoint_count(size: int, interval: int = CHECKPOINT_INTERVAL) -> int:
    """How many checkpoints a span of `size` bytes has: one per interval, before its end."""
    return (size - 1) // interval if size > 0 else 0


def resumable() -> bool:
    """Whether `Sha256` can be used here."""
    return _openssl() is not None


@functools.cache
def _openssl() -> Any:
    """OpenSSL's SHA-256 functions and SHA256_CTX, loaded and self-tested once; None
    if unusable. (ctypes is only imported here: a forked build's parent does not hash.)"""
    try:
        import ctypes
    except ImportError:  # a Python without it, or one whose files this user cannot read
        return None

    class Context(ctypes.Structure):
        """OpenSSL's SHA256_CTX (unchanged since 0.9.8)."""

        _fields_ = [
            ("h", ctypes.c_uint32 * 8),
            ("Nl", ctypes.c_uint32),
            ("Nh", ctypes.c_uint32),
            ("data", ctypes.c_uint32 * 16),
            ("num", ctypes.c_uint),
            ("md_len", ctypes.c_uint),
        ]

    for name in _LIBRARIES:
        try:
            library = ctypes.CDLL(name)  # releases the GIL while it hashes
            for function in ("SHA256_Init", "SHA256_Update", "SHA256_Final"):
                getattr(library, function).restype = ctypes.c_int
            library.SHA256_Init.argtypes = [ctypes.c_void_p]
            library.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
            library.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        except (OSError, AttributeError):
            continue
        openssl = _OpenSSL(ctypes, library, Context)
        if _self_test(openssl):
            return openssl
    return None


class _OpenSSL:
    def __init__(self, ctypes: Any, library: Any, context: Any) -> None:
        self.ctypes, self.library, self.context = ctypes, library, context


def _self_test(openssl: _OpenSSL) -> bool:
    data = bytes(range(256)) * 3
    try:
        whole = Sha256(openssl=openssl)
        whole.update(data)
        first = Sha256(openssl=openssl)
        first.update(data[:128])
        rest = Sha256(first.state(), 128, openssl=openssl)
        rest.update(data[128:])
        expected = hashlib.sha256(data).digest()
        return whole.digest() == expected and rest.digest() == expected
    except (OSError, ValueError, openssl.ctypes.ArgumentError):
        return False


class Sha256:
    """One chain of SHA-256, from the start or resumed from a checkpoint.

    `state` is a checkpoint taken after `length` bytes (a multiple of 64).
    Only usable where `resumable()` is True.
    """

    def __init__(
        self, state: bytes | None = None, length: int = 0, *, openssl: _OpenSSL | None = None
    ) -> None:
        self._openssl = openssl or _openssl()
        ctypes = self._openssl.ctypes
        self._context = self._openssl.context()
        self._pointer = ctypes.byref(self._context)
        self._openssl.library.SHA256_Init(self._pointer)
        self.length = 0
        if state is not None:
            if length % 64 or len(state) != STATE_SIZE:
                raise ValueError("a checkpoint is 32 bytes at a multiple of 64 bytes")
            self._context.h[:] = _STATE.unpack(state)
            bits = length * 8
            self._context.Nl, self._context.Nh = bits & 0xFFFFFFFF, bits >> 32
            self.length = length

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not view.nbytes:
            return
        if view.readonly:
            view = memoryview(bytearray(view))  # only the self-test and tests hash bytes
        ctypes = self._openssl.ctypes
        # Its first byte (one ctypes type, not one per length), which keeps
        # the buffer exported, so in place, until the call returns.
        first = ctypes.c_char.from_buffer(view)
        self._openssl.library.SHA256_Update(self._pointer, ctypes.addressof(first), view.nbytes)
        self.length += view.nbytes

    def state(self) -> bytes:
        """The checkpoint here: only at a multiple of 64 bytes."""
        if self.length % 64:
            raise ValueError("a checkpoint is only taken at a multiple of 64 bytes")
        return _STATE.pack(*self._context.h)

    def digest(self) -> bytes:
        """The digest of everything so far (the chain can go on)."""
        ctypes = self._openssl.ctypes
        final = self._openssl.context.from_buffer_copy(self._context)
        out = ctypes.create_string_buffer(32)
        self._openssl.library.SHA256_Final(out, ctypes.byref(final))
        return bytes(out.raw)
