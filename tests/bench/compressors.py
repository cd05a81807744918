#!/usr/bin/env python3
"""Measure the candidate layer compressors on one tar: speed and ratio.

    python3 tests/bench/compressors.py TAR        # e.g. 300 MB of a store

Each is fed 1 MiB at a time, as guix-image feeds them; zstd also with
workers. Needs `pip install isal zlib-ng zstandard` (those missing are skipped).
The results that chose guix-image's compressors are in RESULTS.md.
"""

from __future__ import annotations

import hashlib
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

CHUNK = 1 << 20


def measure(name: str, make: Callable[[], Any], data: bytes) -> None:
    start = time.perf_counter()
    compressor = make()
    size = sum(len(compressor.compress(data[i : i + CHUNK])) for i in range(0, len(data), CHUNK))
    size += len(compressor.flush())
    seconds = time.perf_counter() - start
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
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    print(f"SHA-256: {len(data) / (time.perf_counter() - start) / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
