"""Progress on stderr: a rich bar on a terminal, plain lines otherwise, or nothing."""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO


class LineProgress:
    """One line per layer, as the reference script prints them (for logs and pipes)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def layer_started(self, number: int, total: int, description: str) -> None:
        print(f"Creating layer {number} {description}", file=self.stream, flush=True)

    def layer_sized(self, size: int) -> None:
        pass

    def layer_progress(self, written: int) -> None:
        pass

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """One rich progress bar for the layer being written; it vanishes when done."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        # One line that fits: at 80 columns the label, sizes, speed and time take
        # 45 columns; the bar (10 there) and the package's name share the rest.
        self._width = console.width
        self._progress = Progress(
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(bar_width=max(10, min(30, self._width - 70))),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}", style="dim", markup=False),
            console=console,
            transient=True,
        )
        self._task = self._progress.add_task("", total=None, label="starting")
        self._started = False

    def layer_started(self, number: int, total: int, description: str) -> None:
        if not self._started:
            # Its refreshing thread starts only now, after the build forked
            # its hashing process: the rule in fastpath/__init__.py.
            self._progress.start()
            self._started = True
        self._progress.update(
            self._task,
            label=f"layer {number}/{total}",
            description=_shorten(package_names(description), max(12, self._width - 56)),
            completed=0,
            total=None,
        )

    def layer_sized(self, size: int) -> None:
        self._progress.update(self._task, total=size)

    def layer_progress(self, written: int) -> None:
        self._progress.update(self._task, completed=written)

    def message(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def close(self) -> None:
        if self._started:
            self._progress.stop()


def package_names(description: str) -> str:
    """ "python3-3.11.7 (+2 more)" for 'from paths: ["/gnu/store/<hash>-python3-3.11.7",
    ...]': the store hash says nothing to a person watching."""
    paths: list[str] = re.findall(r'"(/[^"]+)"', description)
    if not paths:
        return description
    first = os.path.basename(paths[0]).partition("-")[2] or os.path.basename(paths[0])
    return first + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
