"""Man pages, written from the Click command tree (so they say what --help says).

    python3 -m guix_image.cli.manpage DIRECTORY   # writes guix-image.1, guix-image-build.1, ...

The pages ship in the package (guix_image/man/); a test checks that they
match what this module writes now.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

from .. import __version__

DATE = "2026"


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _paragraphs(help_text: str) -> list[str]:
    """Click help text as roff: \\b blocks stay as they are, other text flows."""
    out: list[str] = []
    for block in inspect.cleandoc(help_text).split("\n\n"):
        if block.startswith("\b\n"):
            lines = block[2:].split("\n")
            out.append(".PP\n.nf\n" + "\n".join(_escape(line) for line in lines) + "\n.fi")
        else:
            out.append(".PP\n" + _escape(" ".join(line.strip() for line in block.split("\n"))))
    return out


def _option_entry(option: click.Option, ctx: click.Context) -> str:
    names = ", ".join(option.opts + option.secondary_opts)
    if not option.is_flag and not option.count:
        names += " " + option.make_metavar(ctx)
    return f".TP\n.B {_escape(names)}\n{_escape(option.help or '')}"


def manpage(command: click.Command, path: list[str]) -> str:
    """The roff source of the man page for `command`, called as `path`."""
    name = "-".join(path)
    ctx = click.Context(command, info_name=" ".join(path))
    summary = command.get_short_help_str(limit=80).rstrip(".")
    usage = " ".join(command.collect_usage_pieces(ctx))
    sections = [
        f'.TH "{name.upper()}" "1" "{DATE}" "guix-image {__version__}" "User Commands"',
        ".SH NAME",
        f"{_escape(name)} \\- {_escape(summary)}",
        ".SH SYNOPSIS",
        f".B {_escape(' '.join(path))}\n{_escape(usage)}",
        ".SH DESCRIPTION",
        *_paragraphs(command.help or ""),
    ]
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    if options:
        sections += [".SH OPTIONS", *(_option_entry(option, ctx) for option in options)]
    if isinstance(command, click.Group):
        sections.append(".SH COMMANDS")
        for sub_name, sub in sorted(command.commands.items()):
            sections.append(
                f".TP\n.B {_escape(sub_name)}\n{_escape(sub.get_short_help_str(limit=80))}\n"
                f"See \\fB{_escape(name)}\\-{_escape(sub_name)}\\fR(1)."
            )
    else:
        sections += [".SH SEE ALSO", f"\\fB{_escape(path[0])}\\fR(1)"]
    return "\n".join(sections) + "\n"


def all_pages(cli: click.Group) -> dict[str, str]:
    """File name -> page, for the program and each of its commands."""
    pages = {"guix-image.1": manpage(cli, ["guix-image"])}
    for name, command in sorted(cli.commands.items()):
        pages[f"guix-image-{name}.1"] = manpage(command, ["guix-image", name])
    return pages


def main() -> None:
    from .app import main as cli

    directory = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "man")
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, page in all_pages(cli).items():
        (directory / file_name).write_text(page)
        print(directory / file_name)


if __name__ == "__main__":
    main()
