"""The output stream: digests of spans, copied and mapped files, changes caught."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from guix_image import hashing_writer
from guix_image.hashing_writer import FileChanged, HashingWriter
from guix_image.tarwriter import padding


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, view: memoryview) -> None:
        self.data += view


def test_spans_are_hashed_and_everything_is_written_in_order() -> None:
    sink = Collect()
    parts = [os.urandom(n) for n in (10, 5000, 3 << 20, 7, 1 << 20)]
    with HashingWriter(sink, block_size=1 << 20, blocks=3) as writer:
        writer.write(parts[0])
        first = writer.begin_digest()
        writer.write(parts[1])
        writer.write(parts[2])
        writer.end_digest()
        writer.write_zeros(100)
        second = writer.begin_digest()
        writer.write(parts[3])
        writer.write(parts[4])
        writer.end_digest()
        writer.drain()
        assert first.hexdigest() == hashlib.sha256(parts[1] + parts[2]).hexdigest()
        assert second.hexdigest() == hashlib.sha256(parts[3] + parts[4]).hexdigest()
        assert writer.position == sum(map(len, parts)) + 100
    assert bytes(sink.data) == parts[0] + parts[1] + parts[2] + bytes(100) + parts[3] + parts[4]


def write_files(
    tmp_path: Path, sizes: list[int], **writer_options: int
) -> tuple[bytes, str, bytes]:
    rng = random.Random(7)
    expected = bytearray()
    sink = Collect()
    with HashingWriter(sink, **writer_options) as writer:
        digest = writer.begin_digest()
        for i, size in enumerate(sizes):
            path = tmp_path / f"f{i}"
            content = rng.randbytes(size)
            path.write_bytes(content)
            header = bytes([65 + i % 26]) * 512
            writer.write_file(header, os.fsencode(path), size)
            expected += header + content + bytes(padding(size))
        writer.end_digest()
    return bytes(sink.data), digest.hexdigest(), bytes(expected)


SIZES = [0, 1, 511, 512, 513, 100_000, (1 << 20) - 1, 1 << 20, (5 << 20) + 3, 9 << 20]


def test_copied_files_are_framed_and_hashed(tmp_path: Path) -> None:
    data, digest, expected = write_files(tmp_path, SIZES, block_size=1 << 20, blocks=2)
    assert data == expected
    assert digest == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize(("actual", "message"), [(10, "grew"), (3, "shrank")])
def test_size_changes_are_caught(tmp_path: Path, actual: int, message: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"z" * actual)
    with pytest.raises(FileChanged, match=message), HashingWriter(Collect()) as writer:
        writer.write_file(b"h" * 512, os.fsencode(path), 5)


def test_sink_errors_reach_the_caller() -> None:
    def broken(view: memoryview) -> None:
        raise OSError(5, "Input/output error")

    with (
        pytest.raises(
            hashing_writer.OperationError, match=r"cannot write the output: .*Input/output"
        ),
        HashingWriter(broken, block_size=1 << 20, blocks=2) as writer,
    ):
        for _ in range(10):
            writer.write(bytes(1 << 20))


def test_a_closed_pipe_is_passed_on_as_such() -> None:
    def closed(view: memoryview) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with (
        pytest.raises(BrokenPipeError),
        HashingWriter(closed, block_size=1 << 20, blocks=2) as writer,
    ):
        for _ in range(10):
            writer.write(bytes(1 << 20))
