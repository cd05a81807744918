"""The `guix-image` command line: a thin Click layer over the core.

Heavy modules (rich, the builder, the readers) are imported inside the
commands so that `--help` and shell completion start fast.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import click

from . import __version__
from .errors import GuixImageError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CommandError(click.ClickException):
    """A core error shown as one line, with the core's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
        except click.Abort:
            click.echo("guix-image: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GuixImageError as error:
            if _debug(ctx):
                traceback.print_exc()
            raise CommandError(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            if _debug(ctx):
                traceback.print_exc()
            click.echo("guix-image: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BaseException as error:
            from .output import Terminated

            if isinstance(error, Terminated):
                click.echo(f"guix-image: {error}", err=True)
                raise click.exceptions.Exit(128 + error.signum) from None
            if isinstance(error, SystemExit) or _debug(ctx):
                raise
            raise CommandError(
                f"internal error: {type(error).__name__}: {error} (run with --debug for details)", 1
            ) from None


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


@click.group(cls=GuixImageGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="guix-image")
@click.option("--debug", is_flag=True, help="Show a traceback when something fails.")
def main(debug: bool) -> None:
    """Build container images from a Guix or Nix store, and look inside them.

    Start with `guix-image build --example -o example.tar`.
    """


@main.command()
@click.argument("config_file", metavar="CONFIG", required=False, type=click.File("rb"))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the archive to FILE (atomically) instead of standard output.",
)
@click.option(
    "-t", "--tag", "repo_tag", metavar="NAME:TAG", help="Image name, overriding repo_tag."
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    help="Read store paths under DIR, as for a chroot store (nix --store DIR).",
)
@click.option("--example", is_flag=True, help="Build the built-in example image; needs no CONFIG.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither use nor update the layer cache ($XDG_CACHE_HOME/guix-image).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on standard error but errors.")
def build(
    config_file: Any,
    output: str | None,
    repo_tag: str | None,
    root: str | None,
    example: bool,
    no_cache: bool,
    quiet: bool,
) -> None:
    """Stream a Docker image archive of store paths described by CONFIG.

    CONFIG is the JSON file of nixpkgs' streamLayeredImage / `guix pack`
    (stream-layered-image.py), or - for standard input. The archive loads
    with `docker load` and `podman load`; the same CONFIG and store always
    give the same bytes.

    \b
    Examples:
      guix-image build --example -o example.tar
      guix-image build image.json | docker load
      guix-image build image.json -t app:1.0 -o app.tar
    """
    from .config import parse_config, validate_config

    if example == (config_file is not None):
        raise click.UsageError("give either CONFIG or --example")
    if output in (None, "-") and sys.stdout.isatty():
        raise CommandError(
            "refusing to write an image archive to a terminal; use -o FILE or a pipe", 2
        )
    with _example_root() if example else contextlib.nullcontext(None) as example_root:
        if example_root is not None:
            from .example import make_example_store

            config = validate_config(
                make_example_store(example_root), source="example", repo_tag=repo_tag
            )
            root = example_root
        else:
            source = "<stdin>" if config_file.name == "<stdin>" else config_file.name
            config = parse_config(config_file.read(), source=source, repo_tag=repo_tag)
        for warning in config.warnings:
            click.echo(f"warning: {warning}", err=True)
        _run_build(config, output, root, quiet, use_cache=not no_cache and not example)


def _run_build(
    config: Any, output: str | None, root: str | None, quiet: bool, *, use_cache: bool
) -> None:
    from .build import build_image
    from .cache import LayerCache, default_directory
    from .output import atomic_output, terminate_on_signals

    def warn(message: str) -> None:
        click.echo(f"warning: {message}", err=True)

    cache = LayerCache(default_directory(), warn) if use_cache else None
    progress = _build_progress(quiet)
    options = {"root": root, "progress": progress, "cache": cache, "favour_hashing": True}
    try:
        with terminate_on_signals():
            if output in (None, "-"):
                result = build_image(config, _stdout_sink(), **options)
            else:
                with atomic_output(output) as fd:
                    result = build_image(config, fd, **options)
    finally:
        progress.close()
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not quiet:
        tags = ", ".join(result.repo_tags) or "no tag"
        where = f" to {output}" if output not in (None, "-") else ""
        click.echo(
            f"Done: {result.image_id} ({tags}), {len(result.layers)} layers, "
            f"{result.bytes_written} bytes{where}",
            err=True,
        )


def _stdout_sink() -> Any:
    stream = sys.stdout.buffer
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream.write  # not a real file (tests): write through Python
    from .output import enlarge_pipe

    enlarge_pipe(fd)
    return fd


def _build_progress(quiet: bool) -> Any:
    from .progress import BarProgress, LineProgress, QuietProgress

    if quiet:
        return QuietProgress()
    if sys.stderr.isatty():
        from rich.console import Console

        return BarProgress(Console(stderr=True))
    return LineProgress()


@contextlib.contextmanager
def _example_root() -> Iterator[str]:
    import shutil
    import tempfile

    from .example import remove_example_store

    root = tempfile.mkdtemp(prefix="guix-image-example-")
    try:
        yield root
    finally:
        remove_example_store(root)
        shutil.rmtree(root, ignore_errors=True)


def _not_yet(name: str) -> None:
    raise CommandError(f"{name} is not yet implemented", 2)


@main.command()
@click.argument("archive", type=click.Path())
def inspect(archive: str) -> None:
    """Show an image archive's layers, files and digests (not yet implemented)."""
    _not_yet("inspect")


@main.command("diff-layers")
@click.argument("archive_a", metavar="A", type=click.Path())
@click.argument("archive_b", metavar="B", type=click.Path())
def diff_layers(archive_a: str, archive_b: str) -> None:
    """Compare two image archives layer by layer (not yet implemented)."""
    _not_yet("diff-layers")


@main.command()
@click.argument("archive", type=click.Path())
def verify(archive: str) -> None:
    """Check an image archive's digests (not yet implemented)."""
    _not_yet("verify")


if __name__ == "__main__":  # pragma: no cover
    main()
