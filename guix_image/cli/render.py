"""Human output of the reading commands: rich tables on a terminal, plain text in a pipe.

The plain form is stable (one record per line, fixed columns) so that
scripts can rely on it; `--json` is the form meant for programs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _ascii
from typing import TYPE_CHECKING, Any, TextIO

from ..model import SHA256_PREFIX
from .units import counted, human_size

if TYPE_CHECKING:
    from ..analysis.ci import CiReport
    from ..analysis.diff import DiffReport, FileChange
    from ..analysis.inspect import InspectReport, ListedFile
    from ..analysis.verify import Verdict

SHORT_DIGEST = 19  # "sha256:" and 12 hex digits
# Control characters, shown as escapes: a name from an archive must not be
# able to start a new line of output or move the cursor.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def _flat_json(document: dict[str, Any], indent: str) -> str:
    """`json.dumps(document, indent=2, ensure_ascii=True)`, its lines after the first
    starting with `indent`, for an object of scalars; some ten times faster (json's
    C encoder does not indent)."""
    if not document:
        return "{}"
    inner = indent + "  "
    fields = [f"{inner}{_ascii(key)}: {_value(value, inner)}" for key, value in document.items()]
    return "{" + ",".join(fields) + indent + "}"


def _value(value: Any, indent: str) -> str:
    if isinstance(value, str):
        return _ascii(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and math.isfinite(value):
        return float.__repr__(value)
    # Anything else as json writes it, indented to its place.
    return json.dumps(value, indent=2, ensure_ascii=True).replace("\n", indent)


def printable(text: str) -> str:
    """`text` safe to print: control characters and undecodable bytes escaped."""
    if text.isprintable() and text.isascii():
        return text
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return raw.translate(_CONTROLS)


def short(digest: str | None) -> str:
    return (digest or "-")[:SHORT_DIGEST]


def mode_string(kind: str, mode: int) -> str:
    """`ls -l`'s mode column: "drwxr-xr-x" (permission bits only, as listed before)."""
    kinds = {
        "dir": "d",
        "symlink": "l",
        "hardlink": "h",
        "char-device": "c",
        "block-device": "b",
        "fifo": "p",
    }
    bits = "".join(char if mode & (1 << (8 - i)) else "-" for i, char in enumerate("rwxrwxrwx"))
    return kinds.get(kind, "-") + bits


class Output:
    """Where results go: stdout, styled only on a terminal and without NO_COLOR."""

    def __init__(self, *, color: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        terminal = self.stream.isatty()
        self.rich = terminal
        self.color = terminal and color is not False and not os.environ.get("NO_COLOR")
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream, no_color=not self.color, highlight=False)
        return self._console

    def json(self, document: Any) -> None:
        # ASCII escapes keep undecodable names (surrogates) valid JSON on any stdout.
        self.stream.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")

    def json_streamed(self, document: dict[str, Any], key: str, items: Iterable[Any]) -> None:
        """The text `json` writes for `document` with `key: list(items)` added last,
        written as the items come (a listing may hold millions)."""
        head = json.dumps(document, indent=2, ensure_ascii=True)
        assert head.endswith("\n}"), "a non-empty object"
        opening = f"{head[:-2]},\n  {json.dumps(key)}: ["
        write = self.stream.write
        separator = opening + "\n    "
        for item in items:
            write(separator + _flat_json(item, "\n    "))
            separator = ",\n    "
        write(f"{opening}]\n}}\n" if separator != ",\n    " else "\n  ]\n}\n")

    def line(self, text: str = "", style: str | None = None) -> None:
        text = printable(text)
        if self.rich:
            self.console.print(text, markup=False, style=style, soft_wrap=True)
        else:
            self.stream.write(text + "\n")

    def rows(self, headers: list[str], widths: list[int], rows: Iterable[list[str]]) -> None:
        """A table of fixed columns (the last as wide as it needs), written row by
        row as plain text, on a terminal too (a rich table would wait for them all)."""
        write = self.stream.write
        heading = _fixed(headers, widths)
        write(f"\x1b[1m{heading}\x1b[0m\n" if self.color else heading + "\n")
        for row in rows:
            write(_fixed([printable(cell) for cell in row], widths) + "\n")

    def table(self, headers: list[str], rows: list[list[str]], *, title: str | None = None) -> None:
        """Columns as wide as their widest cell. At a terminal the last one (free
        text) is cut to the width, ending in "…": never a digest or a number."""
        rows = [[printable(cell) for cell in row] for row in rows]
        if title:
            self.line(title, "bold")
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers[:-1])]
        limit = shutil.get_terminal_size().columns if self.rich else None
        for number, row in enumerate([headers, *rows]):
            text = _fixed(row, widths)
            if limit is not None and len(text) > limit:
                text = text[: limit - 1] + "…"
            bold = number == 0 and self.color
            self.stream.write(f"\x1b[1m{text}\x1b[0m\n" if bold else text + "\n")


def _fixed(cells: list[str], widths: list[int]) -> str:
    padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
    return "  ".join([*padded, *cells[len(widths) :]]).rstrip()


# -- inspect -------------------------------------------------------------------


def inspect_summary(out: Output, report: InspectReport) -> None:
    config = report.config
    platform = "/".join(str(value or "?") for value in (report.os, report.architecture))
    waste = report.waste
    fields = [
        ("Format", report.format),
        ("Tags", ", ".join(report.repo_tags) or "-"),
        ("Config digest", report.config_digest),
        ("Platform", platform),
        ("Created", report.created or "-"),
        ("Entrypoint", json.dumps(config.get("Entrypoint")) if config.get("Entrypoint") else "-"),
        ("Cmd", json.dumps(config.get("Cmd")) if config.get("Cmd") else "-"),
        ("Env", "; ".join(config.get("Env") or []) or "-"),
        (
            "Total size",
            f"{human_size(report.total_size)} in {counted(len(report.layers), 'layer')}, "
            f"{counted(report.files, 'path')}",
        ),
        (
            "Waste",
            f"{human_size(waste.bytes)} (efficiency {waste.efficiency * 100:.1f}%), "
            f"{counted(waste.duplicated_files, 'file')} in more than one layer",
        ),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        out.line(f"{name + ':':<{width + 1}} {value}")
    out.line()
    rows = [
        [
            str(layer.index),
            short(layer.diff_id),
            human_size(layer.size),
            str(layer.entries),
            layer.compression,
            (layer.comment or layer.created_by or "").replace("\n", " "),
        ]
        for layer in report.layers
    ]
    out.table(["#", "DIFF ID", "SIZE", "ENTRIES", "COMPRESSION", "COMMENT"], rows)
    if waste.largest:
        out.line()
        rows = [
            [human_size(item.bytes), ",".join(map(str, item.layers)), item.path]
            for item in waste.largest
        ]
        out.table(["WASTED", "LAYERS", "PATH"], rows, title="Largest waste:")


def _displayed_path(entry: ListedFile) -> str:
    record = entry.record
    path = record.path + ("/" if record.type == "dir" else "")
    if record.linkname:
        path += f" -> {record.linkname}"
    return path


# The listing's columns: fixed widths, so that rows are written as they come
# (in bounded memory, at once on a terminal); a wider value pushes its row.
FILE_COLUMNS = (("MODE", 10), ("UID:GID", 11), ("SIZE", 12), ("MTIME", 11), ("LAYER", 5))


def inspect_files(out: Output, entries: Iterable[ListedFile], with_layer: bool) -> None:
    columns = [column for column in FILE_COLUMNS if with_layer or column[0] != "LAYER"]
    widths = [width for _, width in columns]
    out.rows([name for name, _ in columns] + ["PATH"], widths, map(_file_row, entries))


def _file_row(entry: ListedFile) -> list[str]:
    record = entry.record
    return [
        mode_string(record.type, record.mode),
        f"{record.uid}:{record.gid}",
        str(record.size),
        f"{record.mtime:.0f}",
        *([str(entry.layer)] if entry.layer is not None else []),
        _displayed_path(entry),
    ]


def inspect_tree(out: Output, entries: Iterable[ListedFile], label: str) -> None:
    from rich.text import Text
    from rich.tree import Tree

    root = Tree(Text(label))
    nodes: dict[str, Any] = {"": root}

    def node(path: str) -> Any:
        """The directory's node, made up (with its parents) where no entry declared it;
        iteratively, as trees may be deep."""
        missing = []
        while path not in nodes:
            missing.append(path)
            path = path.rpartition("/")[0]
        for directory in reversed(missing):
            name = directory.rpartition("/")[2]
            nodes[directory] = nodes[directory.rpartition("/")[0]].add(Text(printable(name) + "/"))
        return nodes[path if not missing else missing[0]]

    for entry in entries:
        record = entry.record
        parent, _, name = record.path.rpartition("/")
        text = name + ("/" if record.type == "dir" else "")
        if record.linkname:
            text += f" -> {record.linkname}"
        if record.type == "file":
            layer = f", layer {entry.layer}" if entry.layer is not None else ""
            text += f"  ({human_size(record.size)}{layer})"
        nodes[record.path] = node(parent).add(Text(printable(text)))
    if out.rich:
        out.console.print(root)
    else:
        from rich.console import Console

        plain = Console(file=out.stream, no_color=True, width=10_000, highlight=False, emoji=False)
        plain.print(root)


def ci_report(out: Output, report: CiReport) -> None:
    """As dive --ci prints it."""
    out.line(f"  efficiency: {report.efficiency * 100:.4f} %")
    out.line(f"  wastedBytes: {report.wasted_bytes} bytes ({human_size(report.wasted_bytes)})")
    out.line(f"  userWastedPercent: {report.user_wasted_percent * 100:.4f} %")
    out.line("Results:")
    for rule in report.rules:
        detail = f": {rule.message}" if rule.status != "PASS" else ""
        style = {"PASS": "green", "FAIL": "bold red"}.get(rule.status)
        out.line(f"  {rule.status}: {rule.name}{detail}", style)
    counts = {
        status: sum(r.status == status for r in report.rules) for status in ("PASS", "FAIL", "SKIP")
    }
    out.line(
        f"Result:{'PASS' if report.ok else 'FAIL'} [Total:{len(report.rules)}] "
        f"[Passed:{counts['PASS']}] [Failed:{counts['FAIL']}] [Warn:0] [Skipped:{counts['SKIP']}]"
    )


# -- diff-layers ---------------------------------------------------------------


def diff_report(out: Output, report: DiffReport, *, differences_only: bool = False) -> None:
    """The differences (-q: only whether the images differ, and nothing if not)."""
    if differences_only:
        if not report.identical:
            out.line("The images differ.", "bold red")
        return
    layers = report.layers
    out.line(
        f"Layers: {len(layers.shared)} shared, {len(layers.only_a)} only in A, "
        f"{len(layers.only_b)} only in B"
    )
    for layer in report.layer_diffs:
        out.line(f"Layer {layer.index}: A {short(layer.a)}  B {short(layer.b)}")
        for change in layer.files:
            out.line("  " + _change_line(change), _CHANGE_STYLES[change.change])
    if report.files:
        out.line("Merged filesystem:")
        for change in report.files:
            out.line("  " + _change_line(change), _CHANGE_STYLES[change.change])
    if report.config:
        out.line("Config:")
        for field in report.config:
            if field.kind == "serialisation":
                out.line(f"  the same fields, in other bytes: {field.a} -> {field.b}")
            else:
                out.line(f"  {field.field}: {json.dumps(field.a)} -> {json.dumps(field.b)}")
    if report.identical:
        out.line("Identical.", "green")
    else:
        out.line("The images differ.", "bold red")


_CHANGE_STYLES = {"added": "green", "removed": "red", "modified": "yellow"}


def _change_line(change: FileChange) -> str:
    marks = {"added": "+", "removed": "-", "modified": "M"}
    line = f"{marks[change.change]} {change.path}"
    if change.fields:
        line += (
            "  ("
            + ", ".join(f"{f.field}: {_brief(f.a)} -> {_brief(f.b)}" for f in change.fields)
            + ")"
        )
    return line


def _brief(value: Any) -> str:
    text = str(value)
    return short(text) if text.startswith(SHA256_PREFIX) else text


# -- verify ---------------------------------------------------------------------


def verify_report(out: Output, verdict: Verdict, *, failures_only: bool = False) -> None:
    """Every check (-q: the failed ones only, and nothing when all pass)."""
    for check in verdict.checks:
        if check.ok and not failures_only:
            out.line(f"PASS  {check.name}", "green")
        elif not check.ok:
            found = f"expected {check.expected}, found {check.actual}"
            out.line(f"FAIL  {check.name}: {found}", "bold red")
    if failures_only and verdict.ok:
        return
    mismatch = verdict.mismatch
    if mismatch is not None:
        out.line(f"First differing layer: {mismatch.layer}")
        for change in mismatch.files:
            out.line("  " + _change_line(change), _CHANGE_STYLES[change.change])
    if verdict.ok:
        out.line("OK: every check passed.", "bold green")
    else:
        out.line(f"FAILED: {counted(verdict.failed, 'check')} failed.", "bold red")
