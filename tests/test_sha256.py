"""Resumable SHA-256: the same digests as hashlib, from the start or from a checkpoint."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from guix_image import sha256
from guix_image.sha256 import Sha256


def test_openssl_is_usable_here() -> None:
    # Python's own hashlib links OpenSSL's libcrypto: where it does, the
    # parallel checking of rebuilt layers must be available.
    assert sha256.resumable()


def test_digests_match_hashlib_however_the_bytes_are_fed() -> None:
    rng = random.Random(3)
    for size in (0, 1, 63, 64, 65, 1000, 100_000):
        data = os.urandom(size)
        ours = Sha256()
        position = 0
        while position < size:
            step = rng.randint(1, 5000)
            ours.update(memoryview(bytearray(data[position : position + step])))
            position += step
        assert ours.digest() == hashlib.sha256(data).digest()
        assert ours.length == size


def test_a_chain_resumed_from_a_checkpoint_reaches_the_same_digest() -> None:
    data = os.urandom(10_000)
    for cut in (0, 64, 640, 9984):
        first = Sha256()
        first.update(data[:cut])
        checkpoint = first.state()
        assert len(checkpoint) == sha256.STATE_SIZE
        rest = Sha256(checkpoint, cut)
        rest.update(data[cut:])
        assert rest.digest() == hashlib.sha256(data).digest()
        assert first.digest() == hashlib.sha256(data[:cut]).digest()  # the chain goes on


def test_a_wrong_checkpoint_gives_another_digest() -> None:
    data = os.urandom(1000)
    first = Sha256()
    first.update(data[:512])
    wrong = bytearray(first.state())
    wrong[0] ^= 1
    rest = Sha256(bytes(wrong), 512)
    rest.update(data[512:])
    assert rest.digest() != hashlib.sha256(data).digest()


def test_checkpoints_only_exist_at_whole_sha256_blocks() -> None:
    chain = Sha256()
    chain.update(b"x" * 100)
    with pytest.raises(ValueError, match="multiple of 64"):
        chain.state()
    with pytest.raises(ValueError, match="multiple of 64"):
        Sha256(bytes(32), 100)
    with pytest.raises(ValueError, match="32 bytes"):
        Sha256(bytes(31), 128)


def test_checkpoint_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha256, "CHECKPOINT_INTERVAL", 64)
    assert [sha256.checkpoint_count(n) for n in (0, 1, 64, 65, 128, 129)] == [0, 0, 0, 1, 1, 2]


def test_without_openssl_nothing_is_resumable(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(sha256, "_LIBRARIES", ("libcrypto-that-is-not-there.so",))
        sha256._openssl.cache_clear()
        try:
            assert not sha256.resumable()
        finally:
            sha256._openssl.cache_clear()
    assert sha256.resumable()
