"""Numbers as people read them: sizes in units, counts with their nouns."""

from __future__ import annotations


def counted(number: int, noun: str) -> str:
    """ "1 layer", "2 layers", "0 layers"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
