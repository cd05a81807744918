#!/usr/bin/env python3
"""Measure the candidate layer compressors on one tar: speed and ratio.

    python3 tests/bench/compressors.py TAR        # e.g. 300 MB of a store

Each is fed 1 MiB at a time on one thread; zstd also with libzstd's own
workers. Then what guix-image does (formats/compression.py): fixed pieces
compressed apart by whichever of its workers is free, in order. Needs
`pip install isal zlib-ng zstandard` (those missing are skipped). The
results that chose guix-image's compressors are in RESULTS.md.
"""

from __future__ import annotations

import hashlib
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

from guix_image.formats import compression

CHUNK = 1 << 20


def measure(name: str, make: Callable[[], Any], data: bytes) -> None:
    start = time.perf_counter()
    compressor = make()
    size = sum(len(compressor.compress(data[i : i + CHUNK])) for i in range(0, len(data), CHUNK))
    size += len(compressor.flush())
    seconds = time.perf_counter() - start
    print(f"| {name} | {seconds:.2f} | {len(data) / seconds / 1e6:.0f} | {size / len(data):.3f} |")


def measure_pieces(method: str, level: int, data: bytes) -> None:
    """guix-image's own way: each piece compressed apart, on every core (up to 4)."""
    piece = compression.PIECE[method]
    view = memoryview(data)
    start = time.perf_counter()
    with compression.choose(method, level).compressors() as workers:
        stream = workers.stream()
        size = sum(len(stream.compress(view[i : i + piece])) for i in range(0, len(data), piece))
        size += len(stream.flush())
    seconds = time.perf_counter() - start
    name = f"{method} {level}, {piece >> 20} MiB pieces apart, {workers.depth - 1} workers"
    print(f"| {name} | {seconds:.2f} | {len(data) / seconds / 1e6:.0f} | {size / len(data):.3f} |")


def main() -> None:
    data = open(sys.argv[1], "rb").read()  # noqa: SIM115
    print("| compressor | s | MB/s | ratio |\n|---|---|---|---|")
    measure("zlib 6", lambda: zlib.compressobj(6, zlib.DEFLATED, -15), data)
    try:
        from isal import isal_zlib

        for level in (1, 2, 3):
            measure(f"igzip {level}", lambda lv=level: isal_zlib.compressobj(lv, 8, -15), data)
    except ImportError:
        print("isal: not installed")
    try:
        from zlib_ng import zlib_ng

        for level in (1, 2, 6):
            measure(f"zlib-ng {level}", lambda lv=level: zlib_ng.compressobj(lv, 8, -15), data)
    except ImportError:
        print("zlib-ng: not installed")
    import zstandard

    for level in (1, 3):
        for workers in (0, 2):
            params = zstandard.ZstdCompressionParameters.from_level(level, threads=workers)
            measure(
                f"zstd {level}, {workers} workers",
                lambda p=params: zstandard.ZstdCompressor(compression_params=p).compressobj(),
                data,
            )
    for method, level in (("gzip", 2), ("zstd", 3)):
        measure_pieces(method, level, data)
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    print(f"SHA-256: {len(data) / (time.perf_counter() - start) / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
