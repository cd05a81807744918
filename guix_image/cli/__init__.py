"""The command line: the only package that imports click or rich.

- app.py: the `guix-image` group, error mapping to exit codes;
- options.py: what every command shares (common options, diagnostics);
- build.py: `build`; read.py: `inspect`, `diff-layers`, `verify`;
- render.py, progress.py: human output on stdout, progress on stderr;
- completion.py, manpage.py: shell completion, and man pages from the commands;
- streams.py: standard streams closed at start.

The console entry point is `guix_image.__main__.run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import main

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    if name == "main":  # imported when asked for: `python -m guix_image` needs less
        from .app import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
