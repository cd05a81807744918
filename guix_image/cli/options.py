"""What every command shares: the common options, diagnostics on stderr, the one-line error."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import click

from .completion import complete_archive, complete_image


class CommandError(click.ClickException):
    """A core error shown as one line, with the core's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # Click declares it a class variable


def _remember(key: str) -> Any:
    """An option callback that records a flag in ctx.meta, which every context shares."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:
            ctx.meta[f"guix_image.{key}"] = value

    return callback


COMMON_OPTIONS = [
    ("-q", "--quiet", "quiet", "Print nothing on standard error but errors."),
    ("-v", "--verbose", "verbose", "Say more on standard error: cache use, timings."),
    (None, "--no-color", "no_color", "No colours, even on a terminal (as NO_COLOR does)."),
    (None, "--debug", "debug", "Show a traceback when something fails."),
]


def common_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """-q, -v, --no-color and --debug: accepted before or after the command name."""
    for short, long, key, text in reversed(COMMON_OPTIONS):
        names = [short, long] if short else [long]
        function = click.option(
            *names, is_flag=True, expose_value=False, callback=_remember(key), help=text
        )(function)
    return function


def flag(name: str) -> bool:
    """Whether a common option was given (anywhere on the command line)."""
    return bool(click.get_current_context().meta.get(f"guix_image.{name}"))


def no_color() -> bool:
    """--no-color, or NO_COLOR set to a non-empty value (no-color.org: an empty one
    does not count)."""
    return flag("no_color") or bool(os.environ.get("NO_COLOR"))


def note(message: str) -> None:
    """A diagnostic on stderr, unless -q."""
    if not flag("quiet"):
        click.echo(message, err=True)


def verbose(message: str) -> None:
    """A diagnostic on stderr with -v (and without -q)."""
    if flag("verbose") and not flag("quiet"):
        click.echo(message, err=True)


def show_traceback(ctx: click.Context) -> None:
    """With --debug, print the traceback of the exception being handled."""
    if ctx.meta.get("guix_image.debug"):
        import traceback

        traceback.print_exc()


# -- what the reading commands share ----------------------------------------------

IMAGE_OPTION = click.option(
    "--image",
    metavar="NAME|ID|N",
    shell_complete=complete_image,
    help="The image to use when the archive holds several: a name as docker reads it "
    "(app = app:latest), an image ID or a unique prefix, or its number from 1.",
)
PLATFORM_OPTION = click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    help="The image for this platform, of a multi-platform archive (linux/arm64, ...).",
)


def _note_json(ctx: click.Context, _: click.Parameter, value: bool) -> bool:
    ctx.meta["guix_image.json"] = value  # errors are then a JSON document too
    return value


JSON_OPTION = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_note_json,
    help='Print one JSON document, and nothing else (an error too: {"error", "exit_code"}).',
)


def archive_argument(name: str, metavar: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument(
        name, metavar=metavar, type=click.Path(allow_dash=True), shell_complete=complete_archive
    )


@contextlib.contextmanager
def opened(
    given: str, stream_options: Any, choice: str | None, platform: str | None = None
) -> Iterator[tuple[Any, Any]]:
    """The archive's source and its chosen image.

    `given` is a path or a skopeo-style reference (`oci:DIR:tag`, ...), whose
    image must agree with `choice` (--image) if both name one.
    `stream_options`: what to read of every layer if the archive is a stream
    (read once, as it arrives).
    """
    from ..formats.images import read_images, select_image
    from ..formats.sources import open_source, parse_reference

    if given.startswith("docker://"):
        with _registry_source(given) as source:
            image = select_image(read_images(source), choice, given, platform)
            verbose(f"{given}: {image.format}, {len(image.layers)} layers")
            yield source, image
        return
    path, named = parse_reference(given)
    if named is not None and choice is not None and named != choice:
        raise CommandError(f"{given} names image {named!r}, and --image {choice!r}", 2)
    started = time.monotonic()
    with (
        _stdin_progress() if path == "-" else contextlib.nullcontext() as stdin,
        open_source(path, stream_options, stdin) as source,
    ):
        where = "<stdin>" if path == "-" else path
        image = select_image(read_images(source), named or choice, where, platform)
        verbose(f"{path}: {image.format}, {len(image.layers)} layers")
        yield source, image
    verbose(f"{path}: read in {time.monotonic() - started:.2f} s")


@contextlib.contextmanager
def _registry_source(given: str) -> Iterator[Any]:
    """An image in a registry, read as the readers read a layout (registry/source.py)."""
    from ..registry.reference import parse_reference as parse_registry_reference
    from ..registry.source import RegistrySource
    from ..registry.transport import connect

    reference = parse_registry_reference(given)
    with RegistrySource(connect(reference), reference) as source:
        yield source


def output() -> Any:
    """Where results go (see render.Output)."""
    from .render import Output

    return Output(color=False if no_color() else None)


def emit(result: Any, as_json: bool, show: Callable[[Any, Any], None]) -> None:
    """A reading command's result (a record with `to_json()`): JSON, or `show` for people."""
    out = output()
    if as_json:
        out.json(result.to_json())
    else:
        show(out, result)


@contextlib.contextmanager
def _stdin_progress() -> Iterator[Any]:
    """Standard input, counted on a rich line on stderr as it arrives (when stderr is
    a terminal): reading a stream of unknown length should not look stuck."""
    stdin = sys.stdin.buffer
    if flag("quiet") or not sys.stderr.isatty() or stdin.isatty():
        yield None
        return
    import io

    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True, no_color=no_color())
    columns = (TextColumn("reading standard input"), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("stdin", total=None)

        class Counted(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                got = cast(Any, stdin).readinto(buffer) or 0
                progress.advance(task, got)
                return got

        yield io.BufferedReader(Counted(), 1 << 20)


@contextlib.contextmanager
def reading_progress(label: str, total: int) -> Iterator[Any]:
    """A rich bar on stderr while layers are read, when stderr is a terminal."""
    if flag("quiet") or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True, no_color=no_color())
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda layer: progress.advance(task, layer.size)
