"""`inspect --ci`: dive's CI gate on wasted space, with dive's rules and `.dive-ci` file.

    rules:
      lowestEfficiency: 0.9           # fail below this efficiency (0 to 1)
      highestWastedBytes: disabled    # fail at or above this many wasted bytes (20MB, 1GiB, ...)
      highestUserWastedPercent: 0.1   # fail at or above this share (0 to 1) of the bytes
                                      # the image adds above its first layer

Each rule passes, fails, or is skipped ("disabled"); the defaults are dive's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .inspect import InspectReport

RULES = ("lowestEfficiency", "highestWastedBytes", "highestUserWastedPercent")
DEFAULTS = {"lowestEfficiency": "0.9", "highestWastedBytes": "disabled"}
DEFAULTS["highestUserWastedPercent"] = "0.1"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2}
_UNITS |= {"g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass
class RuleResult:
    name: str
    status: str  # "PASS", "FAIL" or "SKIP"
    threshold: str
    value: float | int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class CiReport:
    efficiency: float
    wasted_bytes: int
    user_wasted_percent: float
    rules: list[RuleResult]

    @property
    def ok(self) -> bool:
        return all(rule.status != "FAIL" for rule in self.rules)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "efficiency": self.efficiency,
            "wasted_bytes": self.wasted_bytes,
            "user_wasted_percent": self.user_wasted_percent,
            "rules": [rule.to_json() for rule in self.rules],
        }


def read_rules(text: str, where: str) -> dict[str, str]:
    """The rules of a `.dive-ci` file (the YAML dive writes: `rules:` and one
    `name: value` line per rule)."""
    rules: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or line.strip() == "rules:":
            continue
        key, colon, value = line.strip().partition(":")
        if not colon or key not in RULES:
            raise InputError(f"{where}:{number}: not a dive CI rule: {raw.strip()!r}")
        rules[key] = value.strip().strip("\"'")
    return rules


def evaluate(report: InspectReport, rules: dict[str, str]) -> CiReport:
    """Every rule (given, or dive's default) against the image's waste."""
    settings = {**DEFAULTS, **rules}
    wasted = report.waste.bytes
    sizes = [
        layer.uncompressed_size if layer.uncompressed_size is not None else layer.size
        for layer in report.layers
    ]
    user_bytes = sum(sizes[1:])
    user_wasted = wasted / user_bytes if user_bytes else 0.0
    values: dict[str, float | int] = {
        "lowestEfficiency": report.waste.efficiency,
        "highestWastedBytes": wasted,
        "highestUserWastedPercent": round(user_wasted, 4),
    }
    results = [_rule(name, settings[name], values[name]) for name in RULES]
    return CiReport(report.waste.efficiency, wasted, values["highestUserWastedPercent"], results)


def _rule(name: str, setting: str, value: float | int) -> RuleResult:
    if setting.lower() == "disabled":
        return RuleResult(name, "SKIP", setting, value, "rule disabled")
    if name == "highestWastedBytes":
        limit: float = parse_size(setting, name)
        failed = value >= limit
        message = f"{value} wasted bytes, threshold {limit}"
    else:
        limit = _fraction(setting, name)
        failed = value < limit if name == "lowestEfficiency" else value >= limit
        message = f"{value} against threshold {limit}"
    return RuleResult(name, "FAIL" if failed else "PASS", setting, value, message)


def parse_size(text: str, what: str) -> int:
    """20MB (10^6), 20MiB (2^20), 1234: as dive reads sizes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise InputError(f"{what}: {text!r} is not a size (e.g. 20MB, 1GiB, 1234)")
    return int(float(match.group(1)) * _UNITS[unit])


def _fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise InputError(f"{what}: {text!r} is not a fraction from 0 to 1 (or 'disabled')")
    return value
