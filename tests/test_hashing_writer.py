"""The output stream: digests of spans, copied files, changes caught, in both pipelines."""

from __future__ import annotations

import _thread
import hashlib
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guix_image import hashing_writer, sha256
from guix_image.errors import OperationError
from guix_image.hashing_pipeline import Digest, ForkedPipeline, can_fork
from guix_image.hashing_writer import FileChanged, HashingWriter
from guix_image.tarwriter import padding

from .conftest import children


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
    tmp_path: Path, sizes: list[int], *, sink: int | None = None, **writer_options: Any
) -> tuple[bytes, str, bytes]:
    rng = random.Random(7)
    expected = bytearray()
    collected = Collect()
    with HashingWriter(collected if sink is None else sink, **writer_options) as writer:
        digest = writer.begin_digest()
        for i, size in enumerate(sizes):
            path = tmp_path / f"f{i}"
            content = rng.randbytes(size)
            path.write_bytes(content)
            header = bytes([65 + i % 26]) * 512
            writer.write_file(header, os.fsencode(path), size)
            expected += header + content + bytes(padding(size))
        writer.end_digest()
    return bytes(collected.data), digest.hexdigest(), bytes(expected)


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


# -- the forked pipeline: the same stream through a child process -------------


class FileSink:
    """A file descriptor to write to, and what ended up in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def data(self) -> bytes:
        os.close(self.fd)
        return self.path.read_bytes()


@pytest.fixture
def file_sink(tmp_path: Path) -> Iterator[FileSink]:
    before = children(os.getpid())
    sink = FileSink(tmp_path / "out")
    yield sink
    assert children(os.getpid()) == before  # every child forked was waited for


@pytest.mark.parametrize("fork", [True, False])
def test_both_pipelines_write_and_hash_the_same(file_sink: FileSink, fork: bool) -> None:
    rng = random.Random(3)
    parts = [rng.randbytes(n) for n in (10, 5000, (3 << 20) + 5, 7, 1 << 20, 0, 600)]
    digests = []
    with HashingWriter(file_sink.fd, block_size=1 << 20, blocks=3, fork=fork) as writer:
        for part in parts:
            writer.write(b"-" * 3)
            digests.append(writer.begin_digest())
            writer.write(part)
            writer.end_digest()
        writer.drain()
        assert [d.hexdigest() for d in digests] == [hashlib.sha256(p).hexdigest() for p in parts]
        assert [d.size for d in digests] == [len(p) for p in parts]
        writer.write(b"tail")  # after a drain, as the manifests are
    assert file_sink.data() == b"".join(b"---" + p for p in parts) + b"tail"


def test_the_forked_pipeline_copies_files(tmp_path: Path, file_sink: FileSink) -> None:
    _, digest, expected = write_files(
        tmp_path, SIZES, block_size=1 << 20, blocks=2, fork=True, sink=file_sink.fd
    )
    assert file_sink.data() == expected
    assert digest == hashlib.sha256(expected).hexdigest()


def test_the_forked_pipeline_passes_on_a_closed_pipe() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with (
            pytest.raises(BrokenPipeError),
            HashingWriter(write_end, block_size=1 << 20, blocks=2, fork=True) as writer,
        ):
            for _ in range(10):
                writer.write(bytes(1 << 20))
    finally:
        os.close(write_end)


def test_the_forked_pipeline_passes_on_write_errors(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "read-only", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        with (
            pytest.raises(hashing_writer.OperationError, match=r"cannot write the output: .*"),
            HashingWriter(fd, block_size=1 << 20, blocks=2, fork=True) as writer,
        ):
            for _ in range(10):
                writer.write(bytes(1 << 20))
    finally:
        os.close(fd)


def test_aborting_does_not_wait_for_a_reader_that_stopped_reading() -> None:
    read_end, write_end = os.pipe()  # nobody reads: the child blocks in write
    started = time.monotonic()
    try:
        with (
            pytest.raises(FileChanged),
            HashingWriter(write_end, block_size=1 << 20, blocks=4, fork=True) as writer,
        ):
            for _ in range(3):  # the child takes the first, and is stuck writing it
                writer.write(bytes(1 << 20))
            raise FileChanged("a file changed")  # what a build fails with mid-stream
    finally:
        os.close(read_end)
        os.close(write_end)
    assert time.monotonic() - started < 4  # a threaded pipeline would wait 5 s


def test_the_pipeline_is_only_forked_from_a_single_thread(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if len(os.listdir("/proc/self/task")) == 1:  # not under a watchdog thread
            assert can_fork(fd)
        assert not can_fork(Collect())  # a function cannot be called from a child
        for start in (start_with_threading, _thread.start_new_thread):
            stop = threading.Event()
            started = threading.Event()

            def wait(started: threading.Event = started, stop: threading.Event = stop) -> None:
                started.set()
                stop.wait()

            start(wait, ())
            started.wait()
            try:
                assert not can_fork(fd)  # forking next to a running thread can deadlock
            finally:
                stop.set()
    finally:
        os.close(fd)


def start_with_threading(function: Callable[[], None], args: tuple[()]) -> None:
    threading.Thread(target=function, daemon=True).start()


def test_the_forked_pipeline_works_with_descriptors_over_1023(file_sink: FileSink) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the open files limit ({hard}) is too low to open 1100 files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]  # select() fails past 1023
    try:
        part = bytes(range(256)) * 40_000  # 10 MB through 2 blocks: it waits for them
        with HashingWriter(file_sink.fd, block_size=1 << 20, blocks=2, fork=True) as writer:
            digest = writer.begin_digest()
            writer.write(part)
            writer.end_digest()
        assert digest.hexdigest() == hashlib.sha256(part).hexdigest()
        assert file_sink.data() == part
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_build_goes_on_with_threads_when_fork_fails(
    file_sink: FileSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = []

    def no_fork() -> int:
        attempts.append(1)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    descriptors = len(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fork", no_fork)
        with HashingWriter(file_sink.fd, block_size=1 << 20, blocks=2, fork=True) as writer:
            digest = writer.begin_digest()
            writer.write(b"x" * 3_000_000)
            writer.end_digest()
        assert attempts == [1]
        assert len(os.listdir("/proc/self/fd")) == descriptors  # the pipes were closed
    assert digest.hexdigest() == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert file_sink.data() == b"x" * 3_000_000


def test_a_hashing_process_that_dies_fails_the_build_at_once(file_sink: FileSink) -> None:
    with (
        pytest.raises(hashing_writer.OperationError, match="the hashing process stopped"),
        HashingWriter(file_sink.fd, block_size=1 << 20, blocks=2, fork=True) as writer,
    ):
        writer.write(b"x" * 3_000_000)
        os.kill(writer._pipeline._pid, signal.SIGKILL)  # type: ignore[union-attr]
        for _ in range(20):
            writer.write(b"x" * 1_000_000)


def test_the_forked_pipeline_works_with_sigchld_ignored(file_sink: FileSink) -> None:
    """A parent that ignores SIGCHLD has its children reaped by the system."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with HashingWriter(file_sink.fd, block_size=1 << 20, blocks=2, fork=True) as writer:
            writer.write(b"x" * 3_000_000)
        with (
            pytest.raises(hashing_writer.OperationError, match="the hashing process stopped"),
            HashingWriter(file_sink.fd, block_size=1 << 20, blocks=2, fork=True) as writer,
        ):
            writer.write(b"x" * 3_000_000)
            os.kill(writer._pipeline._pid, signal.SIGKILL)  # type: ignore[union-attr]
            time.sleep(0.2)  # reaped by the system before the parent notices
            for _ in range(20):
                writer.write(b"x" * 1_000_000)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert file_sink.data()[:3_000_000] == b"x" * 3_000_000


# -- checkpoints: recorded on a first build, checked in parallel on a rebuild ---

INTERVAL = 4096  # small enough that a test's digests span many stretches


@pytest.fixture
def small_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha256, "CHECKPOINT_INTERVAL", INTERVAL)


def true_checkpoints(data: bytes) -> bytes:
    """The chain's state at every interval before the end, from prefixes hashed anew."""
    states = b""
    for end in range(INTERVAL, len(data), INTERVAL):
        prefix = sha256.Sha256()
        prefix.update(data[:end])
        states += prefix.state()
    return states


def stream(data: bytes, fork: bool, sink: FileSink, expected: bytes = b"") -> Digest:
    with HashingWriter(sink.fd, block_size=3000, blocks=4, fork=fork) as writer:
        assert isinstance(writer._pipeline, ForkedPipeline) == fork
        writer.write(b"header")  # the span does not start at a block's start
        digest = writer.begin_digest(expected)
        writer.write(data)
        writer.end_digest()
        writer.drain()
    assert sink.data() == b"header" + data
    return digest


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize("fork", [True, False])
@pytest.mark.parametrize("size", [0, 100, INTERVAL, INTERVAL + 1, 7 * INTERVAL + 99])
def test_both_pipelines_record_the_chains_checkpoints(
    file_sink: FileSink, fork: bool, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    digest = stream(data, fork, file_sink)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digest.checkpoints == true_checkpoints(data)
    assert len(digest.checkpoints) == sha256.STATE_SIZE * sha256.checkpoint_count(size)
    assert not digest.broken


@pytest.mark.usefixtures("small_interval")
def test_a_rebuild_is_checked_stretch_by_stretch_and_gives_the_digest(file_sink: FileSink) -> None:
    data = random.Random(1).randbytes(9 * INTERVAL + 77)
    digest = stream(data, True, file_sink, true_checkpoints(data))
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert not digest.broken
    assert digest.checkpoints == b""  # checked, not recorded again


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize("where", [0, 4, 8])
def test_bytes_that_miss_a_checkpoint_break_the_digest(file_sink: FileSink, where: int) -> None:
    data = random.Random(2).randbytes(9 * INTERVAL + 77)
    edited = bytearray(data)
    edited[where * INTERVAL + 10] ^= 1  # in the stretch that ends at checkpoint `where`
    digest = stream(bytes(edited), True, file_sink, true_checkpoints(data))
    assert digest.broken


@pytest.mark.usefixtures("small_interval")
def test_bytes_after_the_last_checkpoint_are_checked_by_the_digest(file_sink: FileSink) -> None:
    data = random.Random(4).randbytes(3 * INTERVAL + 50)
    edited = data[:-1] + bytes([data[-1] ^ 1])
    digest = stream(edited, True, file_sink, true_checkpoints(data))
    assert not digest.broken  # no checkpoint to miss: the digest tells
    assert digest.hexdigest() == hashlib.sha256(edited).hexdigest()
    assert digest.hexdigest() != hashlib.sha256(data).hexdigest()


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize(
    "size", [0, INTERVAL, 3 * INTERVAL, 3 * INTERVAL + 1, 3 * INTERVAL + 2000], ids=str
)
def test_a_rebuild_of_any_length_gives_the_true_digest(file_sink: FileSink, size: int) -> None:
    # Checkpoints of the first 3 intervals and 1000 bytes: the stream ends on
    # a checkpoint, after one, or goes on within the last stretch.
    data = random.Random(8).randbytes(max(size, 3 * INTERVAL + 1000))
    digest = stream(data[:size], True, file_sink, true_checkpoints(data[: 3 * INTERVAL + 1000]))
    assert not digest.broken
    assert digest.hexdigest() == hashlib.sha256(data[:size]).hexdigest()


@pytest.mark.parametrize("fork", [True, False])
def test_long_digest_messages_arrive_whole(
    file_sink: FileSink, fork: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sha256, "CHECKPOINT_INTERVAL", 64)  # 32 bytes of checkpoint per 64
    data = random.Random(9).randbytes(40_000)  # 624 checkpoints: a 20 kB message
    digest = stream(data, fork, file_sink)
    assert len(digest.checkpoints) == 624 * sha256.STATE_SIZE
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_drain_after_a_failed_write_fails() -> None:
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        writer = HashingWriter(full, block_size=1 << 16, blocks=4, fork=True)
        digest = writer.begin_digest()
        writer.write(os.urandom(100_000))  # fits in the blocks: nothing waits before the drain
        writer.end_digest()
        with pytest.raises(OperationError, match="No space left"):
            writer.drain()  # it waits for the writes too, so it sees them fail
        writer.abort()
    finally:
        os.close(full)
    assert digest.hexdigest() == hashlib.sha256().hexdigest()  # no digest of lost bytes came


def test_resumed_lengths_past_512_mib_are_counted_right() -> None:
    # The length, in bits, is two 32-bit words; past 2**32 bits the high one counts.
    zeros = memoryview(bytearray(1 << 20))
    length = (1 << 29) + 64
    ours, theirs = sha256.Sha256(), hashlib.sha256()
    for _ in range(512):
        ours.update(zeros)
        theirs.update(zeros)
    ours.update(zeros[:64])
    theirs.update(zeros[:64])
    resumed = sha256.Sha256(ours.state(), length)
    resumed.update(b"tail")
    theirs.update(b"tail")
    assert resumed.digest() == theirs.digest()


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_a_stream_of_another_length_is_never_given_a_wrong_digest(
    file_sink: FileSink, change: str
) -> None:
    data = random.Random(5).randbytes(5 * INTERVAL + 50)
    streamed = data + b"more" * INTERVAL if change == "longer" else data[: 2 * INTERVAL + 9]
    digest = stream(streamed, True, file_sink, true_checkpoints(data))
    if change == "longer":  # past the last checkpoint's stretch: nothing to resume from
        assert digest.broken
    else:
        assert not digest.broken
        assert digest.hexdigest() == hashlib.sha256(streamed).hexdigest()


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize("fork", [True, False])
def test_both_pipelines_catch_a_wrong_checkpoint(file_sink: FileSink, fork: bool) -> None:
    data = random.Random(6).randbytes(4 * INTERVAL + 1)
    checkpoints = bytearray(true_checkpoints(data))
    checkpoints[-1] ^= 1  # a cache entry that does not match its bytes
    digest = stream(data, fork, file_sink, bytes(checkpoints))
    assert digest.broken


@pytest.mark.usefixtures("small_interval")
@pytest.mark.parametrize("fork", [True, False])
def test_without_openssl_digests_come_from_one_chain(
    file_sink: FileSink, fork: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(7).randbytes(5 * INTERVAL)
    with monkeypatch.context() as patch:
        patch.setattr(sha256, "resumable", lambda: False)
        digest = stream(data, fork, file_sink, true_checkpoints(data)[:-1] + b"?")
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert digest.checkpoints == b""
    assert not digest.broken
