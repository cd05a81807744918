"""Help texts: every command and option documented, as sqlite-utils checks."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from guix_image import __version__
from guix_image.cli import main


def all_commands(
    group: click.Group = main, prefix: str = "guix-image"
) -> list[tuple[str, click.Command]]:
    commands: list[tuple[str, click.Command]] = [(prefix, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            commands.extend(all_commands(command, f"{prefix} {name}"))
        else:
            commands.append((f"{prefix} {name}", command))
    return commands


@pytest.mark.parametrize(
    ("path", "command"), all_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_command_and_option_has_help(path: str, command: click.Command) -> None:
    assert command.help, f"{path} has no help text"
    assert command.short_help or command.help.split("\n")[0], path
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{path} option {param.opts} has no help text"


def test_top_level_help_lists_the_four_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("build", "inspect", "diff-layers", "verify"):
        assert f"  {name} " in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
