"""The command line in the test's own process (pytest-click's runner underneath)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import Result

# The `cli` fixture: `cli("inspect", path, input=bytes)` runs guix-image in-process.
Cli = Callable[..., Result]


def inspect_json(
    cli: Cli, target: str | Path, *extra: str, input: bytes | None = None
) -> dict[str, Any]:
    """`inspect TARGET --json`, which must succeed, parsed."""
    result = cli("inspect", str(target), "--json", *extra, input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]
