"""The `guix-image` command line: a thin Click layer over the core.

Heavy modules (rich, the builder, the readers) are imported inside the
commands so that `--help` and shell completion start fast. Errors are
mapped to exit codes here, and only here: the core raises InputError
(exit 2) and OperationError (exit 1), and knows nothing of Click.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from .. import __version__
from ..errors import GuixImageError
from .build import build
from .completion import SHELLS, completion_script
from .options import CommandError, common_options, show_traceback
from .push import push
from .read import diff_layers, inspect, verify

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class GuixImageGroup(click.Group):
    """Turns every error into one line on stderr and an exit code (2 input, 1 failure)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = functools.partial(super().main, args, prog_name, complete_var, False, **extra)
        if not standalone_mode:
            return run()
        try:
            code: Any = run()
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            click.echo(f"Error: {error.format_message()}{hint}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:  # Click's word for a KeyboardInterrupt while it parses
            click.echo("guix-image: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GuixImageError as error:
            show_traceback(ctx)
            from .render import printable

            message = printable(str(error))
            if ctx.meta.get("guix_image.json"):  # a program reads stdout: tell it too
                document = {"error": message, "exit_code": error.exit_code}
                click.echo(json.dumps(document, ensure_ascii=True))
            raise CommandError(message, error.exit_code) from None
        except KeyboardInterrupt:
            show_traceback(ctx)
            click.echo("guix-image: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:
            # Whoever read our output stopped (`| head`): stop quietly, as tools
            # killed by SIGPIPE do, and keep Python from complaining at exit.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(141) from None
        except OSError as error:  # the core words its own; these are our reads and writes
            show_traceback(ctx)
            what = f"cannot use {error.filename}" if error.filename else "cannot write the output"
            raise CommandError(f"{what}: {error.strerror}", 1) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BaseException as error:
            from ..build.output import Terminated

            if isinstance(error, Terminated):
                click.echo(f"guix-image: {error}", err=True)
                raise click.exceptions.Exit(128 + error.signum) from None
            if isinstance(error, SystemExit) or ctx.meta.get("guix_image.debug"):
                raise  # with --debug, Python prints the traceback
            raise CommandError(
                f"internal error: {type(error).__name__}: {error} (run with --debug for details)", 1
            ) from None


def run() -> None:
    """The command line (see __main__.run, the console entry point), then a quick exit.

    Python's own shutdown frees every object one at a time (about 10 ms after
    a build); once the output is flushed, the kernel can free them all at once.
    """
    try:
        main(prog_name="guix-image")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 141
    except OSError:
        code = code or 1
    os._exit(code)


@click.group(cls=GuixImageGroup, context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@click.version_option(__version__, "-V", "--version", prog_name="guix-image")
@common_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """Build container images from a Guix or Nix store, and look inside them.

    \b
    Examples:
      guix-image build --example -o example.tar
      guix-image inspect example.tar
      guix-image verify image.tar --rebuild image.json
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        click.echo(
            "\nNew here? Build the example image and look inside it:\n"
            "  guix-image build --example -o example.tar && guix-image inspect example.tar"
        )


@main.command()
@click.argument("shell", type=click.Choice(SHELLS))
@common_options
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    \b
    Examples:
      guix-image completion bash > ~/.local/share/bash-completion/completions/guix-image
      guix-image completion zsh > ~/.zfunc/_guix-image
      guix-image completion fish > ~/.config/fish/completions/guix-image.fish
    """
    click.echo(completion_script(main, shell), nl=False)


for command in (build, inspect, diff_layers, verify, push):
    main.add_command(command)
