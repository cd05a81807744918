"""`guix-image build`: the command, its progress and its report on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from .completion import complete_config
from .options import CommandError, common_options, flag, note, verbose


@click.command()
@click.argument(
    "config_file",
    metavar="CONFIG",
    required=False,
    type=click.File("rb"),
    shell_complete=complete_config,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the archive to FILE, atomically, instead of standard output.",
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
@common_options
def build(
    config_file: Any,
    output: str | None,
    repo_tag: str | None,
    root: str | None,
    example: bool,
    no_cache: bool,
) -> None:
    """Stream a Docker image archive of the store paths CONFIG describes.

    CONFIG is the JSON file of nixpkgs' streamLayeredImage and Guix's
    stream-layered-image.py, or - for standard input. The archive loads with
    `docker load` and `podman load`; the same CONFIG and store always give
    the same bytes.

    \b
    Examples:
      guix-image build --example -o example.tar
      guix-image build image.json | docker load
      guix-image build image.json -t app:1.0 -o app.tar
    """
    from ..build.config import parse_config, validate_config

    if example == (config_file is not None):
        raise click.UsageError("give either CONFIG or --example")
    if example and root is not None:
        raise click.UsageError("--root reads a store for CONFIG; --example makes its own")
    from .streams import CLOSED

    if output in (None, "-") and 1 in CLOSED:
        raise CommandError("standard output is closed; use -o FILE", 2)
    if output in (None, "-") and sys.stdout.isatty():
        raise CommandError(
            "refusing to write an image archive to a terminal; use -o FILE or a pipe", 2
        )
    with _example_root() if example else contextlib.nullcontext(None) as example_root:
        if example_root is not None:
            from ..build.example import make_example_store

            config = validate_config(
                make_example_store(example_root), source="example", repo_tag=repo_tag
            )
            root = example_root
        else:
            config = parse_config(config_file.read(), source=config_file.name, repo_tag=repo_tag)
        for warning in config.warnings:
            note(f"warning: {warning}")
        _run_build(config, output, root, use_cache=not no_cache and not example)


def _run_build(config: Any, output: str | None, root: str | None, *, use_cache: bool) -> None:
    from ..build.cache import LayerCache, default_directory
    from ..build.engine import build_image
    from ..build.output import atomic_output, terminate_on_signals

    def warn(message: str) -> None:
        note(f"warning: {message}")

    cache = LayerCache(default_directory(), warn) if use_cache else None
    progress = _build_progress()
    options = {"root": root, "progress": progress, "cache": cache}
    started = time.monotonic()
    try:
        with terminate_on_signals():
            if output in (None, "-"):
                result = build_image(config, _stdout_sink(), **options)
            else:
                with atomic_output(output) as fd:
                    result = build_image(config, fd, **options)
    finally:
        progress.close()
    for layer in result.layers:
        state = "cached digest confirmed" if layer.cached else "hashed"
        if layer.listed:
            state += ", files from the cached member list"
        verbose(f"layer {layer.number}: {layer.diff_id}, {layer.size} bytes ({state})")
    where = f" to {output}" if output not in (None, "-") else ""
    note(
        f"Done: {result.image_id} ({', '.join(result.repo_tags) or 'no tag'}), "
        f"{len(result.layers)} layers, {result.bytes_written} bytes{where}"
    )
    pipeline = "in a forked process" if result.forked else "on threads of this process"
    verbose(f"{time.monotonic() - started:.2f} s; hashed and written {pipeline}")


def _stdout_sink() -> Any:
    stream = sys.stdout.buffer
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream.write  # not a real file (tests): write through Python
    from ..build.output import enlarge_pipe

    enlarge_pipe(fd)
    return fd


def _build_progress() -> Any:
    from ..build.engine import SilentProgress
    from .progress import BarProgress, LineProgress

    if flag("quiet"):
        return SilentProgress()
    if sys.stderr.isatty():
        from rich.console import Console

        return BarProgress(Console(stderr=True, no_color=flag("no_color")))
    return LineProgress()


@contextlib.contextmanager
def _example_root() -> Iterator[str]:
    import shutil
    import tempfile

    from ..build.example import remove_example_store

    root = tempfile.mkdtemp(prefix="guix-image-example-")
    try:
        yield root
    finally:
        remove_example_store(root)
        shutil.rmtree(root, ignore_errors=True)
