"""The digest of one span of a stream, hashed in this process or in the forked child."""

from __future__ import annotations

import hashlib
from typing import Any

from ..model import SHA256_PREFIX, Measured
from . import sha256
from .sha256 import STATE_SIZE, Sha256


class Chain:
    """One SHA-256 fed in order, taking a checkpoint every `interval` bytes if asked to
    and if it can (see sha256.py)."""

    def __init__(self, interval: int | None) -> None:
        recording = interval is not None and sha256.resumable()
        self._hash: Any = Sha256() if recording else hashlib.sha256()
        self._interval = interval if recording else None
        self.length = 0
        self._checkpoints = bytearray()

    def update(self, view: memoryview) -> None:
        interval = self._interval
        if interval is None:
            self._hash.update(view)
            self.length += len(view)
            return
        while view:
            part = view[: interval - self.length % interval]
            self._hash.update(part)
            self.length += len(part)
            view = view[len(part) :]
            if self.length % interval == 0:
                self._checkpoints += self._hash.state()

    def digest(self) -> bytes:
        return bytes(self._hash.digest())

    def checkpoints(self) -> bytes:
        """The checkpoints before the end (none if none were taken)."""
        if self._interval is None:
            return b""
        count = sha256.checkpoint_count(self.length, self._interval)
        return bytes(self._checkpoints[: count * STATE_SIZE])


class Digest:
    """The SHA-256 of one span of the stream: pending until the writer is drained.

    `expected` holds the checkpoints of the same bytes, if known (a
    rebuild): the forked pipeline then hashes their stretches in parallel.
    `interval`: take checkpoints that often (None: take none).
    """

    def __init__(self, number: int = 0, expected: bytes = b"", interval: int | None = None) -> None:
        self.number = number  # its place among the writer's digests
        self.size = 0
        self.expected = expected
        self.interval = interval
        self.final = False  # set when the writer has drained every byte of the span
        self._chain: Chain | None = None  # when hashed in this process
        self._computed: tuple[bytes, bytes, bool] | None = None  # digest, checkpoints, broken

    def update(self, data: memoryview) -> None:
        if self._chain is None:
            self._chain = Chain(self.interval)
        self._chain.update(data)
        self.size += len(data)

    def computed(self, digest: bytes, checkpoints: bytes, broken: bool) -> None:
        """Take what another process computed for the same bytes."""
        self._computed = (digest, checkpoints, broken)

    def result(self) -> Measured:
        """What the span measured (see model.PendingDigest)."""
        if not self.final:
            raise RuntimeError("a digest was read before its stream was drained")
        if self._computed is not None:
            digest, checkpoints, broken = self._computed
        else:
            chain = self._chain or Chain(None)  # nothing was hashed: the empty digest
            digest, checkpoints = chain.digest(), chain.checkpoints()
            broken = bool(self.expected and checkpoints and checkpoints != self.expected)
        return Measured(SHA256_PREFIX + digest.hex(), self.size, checkpoints, broken)
