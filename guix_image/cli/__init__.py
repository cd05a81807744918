"""The command line: the only package that imports click or rich.

- app.py: the `guix-image` group, error mapping to exit codes, the entry point;
- options.py: what every command shares (common options, diagnostics);
- build.py: `build`; read.py: `inspect`, `diff-layers`, `verify`;
- render.py, progress.py: human output on stdout, progress on stderr;
- completion.py, manpage.py: shell completion, and man pages from the commands.
"""

from .app import main, run

__all__ = ["main", "run"]
