"""The speed machinery: resumable SHA-256, and the output stream (digests of spans,
copied files, changes caught) through both pipelines, forked and threaded."""

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

from guix_image.errors import FileChanged, OperationError
from guix_image.fastpath import sha256
from guix_image.fastpath.blocks import can_fork, only_thread
from guix_image.fastpath.forked import ForkedPipeline
from guix_image.fastpath.sha256 import Sha256
from guix_image.fastpath.writer import HashingWriter
from guix_image.model import Measured
from guix_image.tar.format import padding

from .support.archives import sha256 as digest_of
from .support.tools import children

# -- resumable SHA-256: the same digests as hashlib, from the start or a checkpoint --


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


def test_checkpoint_count() -> None:
    counts = [sha256.checkpoint_count(n, 64) for n in (0, 1, 64, 65, 128, 129)]
    assert counts == [0, 0, 0, 1, 1, 2]


def test_without_openssl_nothing_is_resumable(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(sha256, "_LIBRARIES", ("libcrypto-that-is-not-there.so",))
        sha256._openssl.cache_clear()
        try:
            assert not sha256.resumable()
        finally:
            sha256._openssl.cache_clear()
    assert sha256.resumable()


def test_resumed_lengths_past_512_mib_are_counted_right() -> None:
    # The length, in bits, is two 32-bit words; past 2**32 bits the high one counts.
    zeros = memoryview(bytearray(1 << 20))
    length = (1 << 29) + 64
    ours, theirs = Sha256(), hashlib.sha256()
    for _ in range(512):
        ours.update(zeros)
        theirs.update(zeros)
    ours.update(zeros[:64])
    theirs.update(zeros[:64])
    resumed = Sha256(ours.state(), length)
    resumed.update(b"tail")
    theirs.update(b"tail")
    assert resumed.digest() == theirs.digest()


# -- the output stream: spans hashed, files copied, errors passed on ------------------


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
        assert first.result().digest == digest_of(parts[1] + parts[2])
        assert second.result().digest == digest_of(parts[3] + parts[4])
        assert writer.position == sum(map(len, parts)) + 100
    assert bytes(sink.data) == parts[0] + parts[1] + parts[2] + bytes(100) + parts[3] + parts[4]


def test_a_digest_is_only_read_after_a_drain() -> None:
    with HashingWriter(Collect(), block_size=1 << 16, blocks=2) as writer:
        digest = writer.begin_digest()
        writer.write(b"abc")
        writer.end_digest()
        with pytest.raises(RuntimeError, match="before its stream was drained"):
            digest.result()
        writer.drain()
        assert (digest.result().digest, digest.result().size) == (digest_of(b"abc"), 3)


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
    return bytes(collected.data), digest.result().digest, bytes(expected)


SIZES = [0, 1, 511, 512, 513, 100_000, (1 << 20) - 1, 1 << 20, (5 << 20) + 3, 9 << 20]


def test_copied_files_are_framed_and_hashed(tmp_path: Path) -> None:
    data, digest, expected = write_files(tmp_path, SIZES, block_size=1 << 20, blocks=2)
    assert data == expected
    assert digest == digest_of(expected)


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
        pytest.raises(OperationError, match=r"cannot write the output: .*Input/output"),
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
        assert writer.forked == fork
        for part in parts:
            writer.write(b"-" * 3)
            digests.append(writer.begin_digest())
            writer.write(part)
            writer.end_digest()
        writer.drain()
        assert [d.result().digest for d in digests] == [digest_of(p) for p in parts]
        assert [d.size for d in digests] == [len(p) for p in parts]
        assert [d.result().size for d in digests] == [len(p) for p in parts]
        writer.write(b"tail")  # after a drain, as the manifests are
    assert file_sink.data() == b"".join(b"---" + p for p in parts) + b"tail"


@pytest.mark.parametrize("fork", [True, False])
def test_unhashed_copies_go_straight_to_the_descriptor_in_order(
    tmp_path: Path, file_sink: FileSink, fork: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy no digest covers is the kernel's (sendfile), once what precedes
    it is written: the stream and the digests are as a copy through the blocks
    gives them."""
    sent = []
    sendfile = os.sendfile

    def counting(out: int, source: int, offset: int | None, count: int) -> int:
        sent.append(count)
        return sendfile(out, source, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    rng = random.Random(5)
    blob = tmp_path / "blob"
    blob.write_bytes(rng.randbytes((3 << 20) + 11))
    before = rng.randbytes((2 << 20) + 3)  # a block and more, still in the pipeline
    with HashingWriter(file_sink.fd, block_size=1 << 20, blocks=3, fork=fork) as writer:
        digest = writer.begin_digest()
        writer.write(before)
        writer.end_digest()
        with blob.open("rb") as source:
            writer.copy_from_fd(source.fileno(), (3 << 20) + 11, str(blob))
        writer.write(b"after")
        writer.drain()
        assert digest.result().digest == digest_of(before)
        assert writer.position == len(before) + (3 << 20) + 11 + 5
    assert sent  # the kernel copied it
    assert file_sink.data() == before + blob.read_bytes() + b"after"


@pytest.mark.parametrize(("actual", "message"), [((2 << 20) + 1, "grew"), (1 << 20, "shrank")])
def test_size_changes_are_caught_in_unhashed_copies(
    tmp_path: Path, file_sink: FileSink, actual: int, message: str
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(actual))
    with (
        pytest.raises(FileChanged, match=message),
        HashingWriter(file_sink.fd, block_size=1 << 20, blocks=2) as writer,
        blob.open("rb") as source,
    ):
        writer.copy_from_fd(source.fileno(), 2 << 20, str(blob))


def test_the_forked_pipeline_copies_files(tmp_path: Path, file_sink: FileSink) -> None:
    _, digest, expected = write_files(
        tmp_path, SIZES, block_size=1 << 20, blocks=2, fork=True, sink=file_sink.fd
    )
    assert file_sink.data() == expected
    assert digest == digest_of(expected)


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
            pytest.raises(OperationError, match=r"cannot write the output: .*"),
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
    alone = len(os.listdir("/proc/self/task")) == 1  # not under a watchdog thread
    try:
        if alone:
            assert can_fork()
        # A function cannot be called from a child: the threads serve it.
        with HashingWriter(Collect()) as writer:
            assert not writer.forked
        for start in (start_with_threading, _thread.start_new_thread):
            stop = threading.Event()
            started = threading.Event()

            def wait(started: threading.Event = started, stop: threading.Event = stop) -> None:
                started.set()
                stop.wait()

            start(wait, ())
            started.wait()
            try:
                assert not can_fork()  # forking next to a running thread can deadlock
                with HashingWriter(fd) as writer:  # by default the threads serve instead
                    assert not writer.forked
                with pytest.raises(RuntimeError, match="refusing to fork"):
                    HashingWriter(fd, fork=True)  # and asking for a fork is refused
            finally:
                stop.set()
    finally:
        os.close(fd)
        # The next tests fork: wait until the threads started here have ended.
        deadline = time.monotonic() + 10
        while alone and not only_thread() and time.monotonic() < deadline:
            time.sleep(0.01)


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
        assert digest.result().digest == digest_of(part)
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
            assert not writer.forked
            digest = writer.begin_digest()
            writer.write(b"x" * 3_000_000)
            writer.end_digest()
        assert attempts == [1]
        assert len(os.listdir("/proc/self/fd")) == descriptors  # the pipes were closed
    assert digest.result().digest == digest_of(b"x" * 3_000_000)
    assert file_sink.data() == b"x" * 3_000_000


def test_a_hashing_process_that_dies_fails_the_build_at_once(file_sink: FileSink) -> None:
    with (
        pytest.raises(OperationError, match="the hashing process stopped"),
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
            pytest.raises(OperationError, match="the hashing process stopped"),
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
    # No digest of lost bytes came: none from the child, none hashed here, and none
    # can be read (the stream was never drained).
    assert digest._computed is None and digest._chain is None
    with pytest.raises(RuntimeError, match="before its stream was drained"):
        digest.result()


# -- checkpoints: recorded on a first build, checked in parallel on a rebuild ---

INTERVAL = 4096  # small enough that a test's digests span many stretches


def true_checkpoints(data: bytes) -> bytes:
    """The chain's state at every interval before the end, from prefixes hashed anew."""
    states = b""
    for end in range(INTERVAL, len(data), INTERVAL):
        prefix = Sha256()
        prefix.update(data[:end])
        states += prefix.state()
    return states


def stream(
    data: bytes, fork: bool, sink: FileSink, expected: bytes = b"", interval: int = INTERVAL
) -> Measured:
    with HashingWriter(
        sink.fd, block_size=3000, blocks=4, fork=fork, checkpoint_interval=interval
    ) as writer:
        assert isinstance(writer._pipeline, ForkedPipeline) == fork
        assert writer.forked == fork
        writer.write(b"header")  # the span does not start at a block's start
        digest = writer.begin_digest(expected)
        writer.write(data)
        writer.end_digest()
        writer.drain()
    assert sink.data() == b"header" + data
    return digest.result()


@pytest.mark.parametrize("fork", [True, False])
@pytest.mark.parametrize("size", [0, 100, INTERVAL, INTERVAL + 1, 7 * INTERVAL + 99])
def test_both_pipelines_record_the_chains_checkpoints(
    file_sink: FileSink, fork: bool, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    digest = stream(data, fork, file_sink)
    assert digest.digest == digest_of(data)
    assert digest.checkpoints == true_checkpoints(data)
    assert len(digest.checkpoints) == sha256.STATE_SIZE * sha256.checkpoint_count(size, INTERVAL)
    assert not digest.broken


def test_a_rebuild_is_checked_stretch_by_stretch_and_gives_the_digest(file_sink: FileSink) -> None:
    data = random.Random(1).randbytes(9 * INTERVAL + 77)
    digest = stream(data, True, file_sink, true_checkpoints(data))
    assert digest.digest == digest_of(data)
    assert not digest.broken
    assert digest.checkpoints == b""  # checked, not recorded again


@pytest.mark.parametrize("where", [0, 4, 8])
def test_bytes_that_miss_a_checkpoint_break_the_digest(file_sink: FileSink, where: int) -> None:
    data = random.Random(2).randbytes(9 * INTERVAL + 77)
    edited = bytearray(data)
    edited[where * INTERVAL + 10] ^= 1  # in the stretch that ends at checkpoint `where`
    digest = stream(bytes(edited), True, file_sink, true_checkpoints(data))
    assert digest.broken


def test_bytes_after_the_last_checkpoint_are_checked_by_the_digest(file_sink: FileSink) -> None:
    data = random.Random(4).randbytes(3 * INTERVAL + 50)
    edited = data[:-1] + bytes([data[-1] ^ 1])
    digest = stream(edited, True, file_sink, true_checkpoints(data))
    assert not digest.broken  # no checkpoint to miss: the digest tells
    assert digest.digest == digest_of(edited)
    assert digest.digest != digest_of(data)


@pytest.mark.parametrize(
    "size", [0, INTERVAL, 3 * INTERVAL, 3 * INTERVAL + 1, 3 * INTERVAL + 2000], ids=str
)
def test_a_rebuild_of_any_length_gives_the_true_digest(file_sink: FileSink, size: int) -> None:
    # Checkpoints of the first 3 intervals and 1000 bytes: the stream ends on
    # a checkpoint, after one, or goes on within the last stretch.
    data = random.Random(8).randbytes(max(size, 3 * INTERVAL + 1000))
    digest = stream(data[:size], True, file_sink, true_checkpoints(data[: 3 * INTERVAL + 1000]))
    assert not digest.broken
    assert digest.digest == digest_of(data[:size])


@pytest.mark.parametrize("fork", [True, False])
def test_long_digest_messages_arrive_whole(file_sink: FileSink, fork: bool) -> None:
    data = random.Random(9).randbytes(40_000)  # 624 checkpoints: a 20 kB message
    digest = stream(data, fork, file_sink, interval=64)  # 32 bytes of checkpoint per 64
    assert len(digest.checkpoints) == 624 * sha256.STATE_SIZE
    assert digest.digest == digest_of(data)


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
        assert digest.digest == digest_of(streamed)


@pytest.mark.parametrize("fork", [True, False])
def test_both_pipelines_catch_a_wrong_checkpoint(file_sink: FileSink, fork: bool) -> None:
    data = random.Random(6).randbytes(4 * INTERVAL + 1)
    checkpoints = bytearray(true_checkpoints(data))
    checkpoints[-1] ^= 1  # a cache entry that does not match its bytes
    digest = stream(data, fork, file_sink, bytes(checkpoints))
    assert digest.broken


@pytest.mark.parametrize("fork", [True, False])
def test_without_openssl_digests_come_from_one_chain(
    file_sink: FileSink, fork: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(7).randbytes(5 * INTERVAL)
    with monkeypatch.context() as patch:
        patch.setattr(sha256, "resumable", lambda: False)
        digest = stream(data, fork, file_sink, true_checkpoints(data)[:-1] + b"?")
    assert digest.digest == digest_of(data)
    assert digest.checkpoints == b""
    assert not digest.broken
