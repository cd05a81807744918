"""Rows kept in sorted order in bounded memory, however many there are.

Rows (tuples) are appended in any order and read back sorted. Up to
`run_rows` of them are held in memory while they come; beyond that each
full batch is sorted and written as a run to a `Scratch` file, and reading
merges the runs, holding one chunk of each. Once appending is over
(`settle`), rows stay in memory only while all the sets sharing the scratch
file keep fewer than its budget.

The scratch file is unlinked from the start, so nothing is ever left on
disk, whatever kills the process. Forked workers write into the file their
parent opened, at offsets handed out by a counter they share with it.

Rows must be totally ordered by their leading fields: equal rows would make
Python compare what follows.
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Iterator
from typing import Any

RUN_ROWS = 50_000  # rows held while appending: about 15 MB of a layer's entries
CHUNK_ROWS = 256  # rows read back at once from each run
KEEP_ROWS = 200_000  # rows all settled sets of one scratch file keep in memory

Row = tuple[Any, ...]
Chunk = tuple[int, int]  # offset and length in the scratch file
Runs = list[list[Chunk]]


class Scratch:
    """An unlinked file that sets of rows spill into, and their memory budget."""

    def __init__(self, *, keep_rows: int = KEEP_ROWS, forking: bool = False) -> None:
        self._keep_rows = keep_rows
        self._kept = 0
        self._file: Any = None  # made at the first spill, which most reads never reach
        if forking:  # the file, and a counter and lock, shared with the workers forked later
            import multiprocessing

            self._open()
            self._end: Any = multiprocessing.get_context("fork").Value("q", 0)
            self._lock: Any = self._end.get_lock()
        else:
            self._end, self._lock = None, threading.Lock()
            self._offset = 0

    def _open(self) -> int:
        if self._file is None:
            import tempfile  # here: the module costs a start-up that a build need not pay

            self._file = tempfile.TemporaryFile(prefix="guix-image-rows-")  # noqa: SIM115
        return int(self._file.fileno())

    def write(self, data: bytes) -> Chunk:
        with self._lock:
            descriptor = self._open()
            if self._end is None:
                offset, self._offset = self._offset, self._offset + len(data)
            else:
                offset = self._end.value
                self._end.value = offset + len(data)
        # At an explicit offset: other threads and processes write the same file.
        os.pwrite(descriptor, data, offset)
        return offset, len(data)

    def read(self, chunk: Chunk) -> bytes:
        offset, length = chunk
        return os.pread(self._open(), length, offset)

    def keep(self, rows: int) -> bool:
        """May `rows` more rows stay in memory?"""
        with self._lock:
            if self._kept + rows > self._keep_rows:
                return False
            self._kept += rows
            return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class SortedRows:
    """Append rows; iterate them sorted, as often as needed."""

    def __init__(self, scratch: Scratch | None = None, *, run_rows: int = RUN_ROWS) -> None:
        self._scratch = scratch
        self._run_rows = run_rows
        self._pending: list[Row] = []
        self._sorted_pending = 0  # how many of the rows in memory are known sorted
        self._runs: Runs = []
        self._spilled = 0

    def append(self, row: Row) -> None:
        pending = self._pending
        pending.append(row)
        if len(pending) >= self._run_rows:
            self.spill()

    @property
    def count(self) -> int:
        return self._spilled + len(self._pending)

    def settle(self) -> None:
        """No more rows: keep the ones in memory only if the budget allows."""
        if not self._runs:
            if self._scratch is None and len(self._pending) <= KEEP_ROWS:
                return  # a set of its own
            if self._scratch is not None and self._scratch.keep(len(self._pending)):
                return
        self.spill()

    def spill(self) -> None:
        """Write the rows held in memory as a sorted run."""
        if not self._pending:
            return
        import pickle

        scratch = self._scratch_of()
        self._pending.sort()
        pending = self._pending
        run = [
            scratch.write(pickle.dumps(pending[start : start + CHUNK_ROWS], protocol=5))
            for start in range(0, len(pending), CHUNK_ROWS)
        ]
        self._runs.append(run)
        self._spilled += len(pending)
        self._pending, self._sorted_pending = [], 0

    def _scratch_of(self) -> Scratch:
        if self._scratch is None:
            self._scratch = Scratch()
        return self._scratch

    @property
    def scratch(self) -> Scratch | None:
        return self._scratch

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Row]:
        if self._sorted_pending != len(self._pending):
            self._pending.sort()
            self._sorted_pending = len(self._pending)
        if not self._runs:
            return iter(self._pending)
        return heapq.merge(*map(self._read_run, self._runs), iter(self._pending))

    def _read_run(self, run: list[Chunk]) -> Iterator[Row]:
        import pickle

        scratch = self._scratch_of()
        for chunk in run:
            yield from pickle.loads(scratch.read(chunk))

    # Rows a forked worker wrote into the scratch file its parent opened.

    def detach(self) -> tuple[Runs, int]:
        """Everything written out; what `attach` needs to read it in another process."""
        self.spill()
        return self._runs, self.count

    @classmethod
    def attach(cls, written: tuple[Runs, int], scratch: Scratch) -> SortedRows:
        rows = cls(scratch)
        rows._runs, rows._spilled = written
        return rows
