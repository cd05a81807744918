"""The `guix-image` command line: a thin Click layer over the core.

Heavy modules (rich, the builder, the readers) are imported inside the
commands so that `--help` and shell completion start fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from . import __version__
from .completion import (
    SHELLS,
    complete_archive,
    complete_config,
    complete_image,
    complete_layer,
    completion_script,
)
from .errors import GuixImageError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CommandError(click.ClickException):
    """A core error shown as one line, with the core's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # Click declares it a class variable


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
            _show_traceback(ctx)
            from .render import printable

            raise CommandError(printable(str(error)), error.exit_code) from None
        except KeyboardInterrupt:
            _show_traceback(ctx)
            click.echo("guix-image: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except BrokenPipeError:
            # Whoever read our output stopped (`| head`): stop quietly, as tools
            # killed by SIGPIPE do, and keep Python from complaining at exit.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(141) from None
        except OSError as error:  # the core words its own; these are our reads and writes
            _show_traceback(ctx)
            what = f"cannot use {error.filename}" if error.filename else "cannot write the output"
            raise CommandError(f"{what}: {error.strerror}", 1) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BaseException as error:
            from .output import Terminated

            if isinstance(error, Terminated):
                click.echo(f"guix-image: {error}", err=True)
                raise click.exceptions.Exit(128 + error.signum) from None
            if isinstance(error, SystemExit) or ctx.meta.get("guix_image.debug"):
                raise  # with --debug, Python prints the traceback
            raise CommandError(
                f"internal error: {type(error).__name__}: {error} (run with --debug for details)", 1
            ) from None


def run() -> None:
    """The console entry point: `main`, then a quick exit.

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


# -- options every command shares ---------------------------------------------


def _show_traceback(ctx: click.Context) -> None:
    """With --debug, print the traceback of the exception being handled."""
    if ctx.meta.get("guix_image.debug"):
        import traceback

        traceback.print_exc()


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


def _flag(name: str) -> bool:
    return bool(click.get_current_context().meta.get(f"guix_image.{name}"))


def _note(message: str) -> None:
    """A diagnostic on stderr, unless -q."""
    if not _flag("quiet"):
        click.echo(message, err=True)


def _verbose(message: str) -> None:
    if _flag("verbose") and not _flag("quiet"):
        click.echo(message, err=True)


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


# -- build ----------------------------------------------------------------------


@main.command()
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
    from .config import parse_config, validate_config

    if example == (config_file is not None):
        raise click.UsageError("give either CONFIG or --example")
    if example and root is not None:
        raise click.UsageError("--root reads a store for CONFIG; --example makes its own")
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
            config = parse_config(config_file.read(), source=config_file.name, repo_tag=repo_tag)
        for warning in config.warnings:
            _note(f"warning: {warning}")
        _run_build(config, output, root, use_cache=not no_cache and not example)


def _run_build(config: Any, output: str | None, root: str | None, *, use_cache: bool) -> None:
    from .build import build_image
    from .cache import LayerCache, default_directory
    from .output import atomic_output, terminate_on_signals

    def warn(message: str) -> None:
        _note(f"warning: {message}")

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
    for warning in result.warnings:
        _note(f"warning: {warning}")
    for layer in result.layers:
        state = "cached digest confirmed" if layer.cached else "hashed"
        if layer.listed:
            state += ", files from the cached member list"
        _verbose(f"layer {layer.number}: {layer.diff_id}, {layer.size} bytes ({state})")
    where = f" to {output}" if output not in (None, "-") else ""
    _note(
        f"Done: {result.image_id} ({', '.join(result.repo_tags) or 'no tag'}), "
        f"{len(result.layers)} layers, {result.bytes_written} bytes{where}"
    )
    _verbose(f"{time.monotonic() - started:.2f} s")


def _stdout_sink() -> Any:
    stream = sys.stdout.buffer
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream.write  # not a real file (tests): write through Python
    from .output import enlarge_pipe

    enlarge_pipe(fd)
    return fd


def _build_progress() -> Any:
    from .build import SilentProgress
    from .progress import BarProgress, LineProgress

    if _flag("quiet"):
        return SilentProgress()
    if sys.stderr.isatty():
        from rich.console import Console

        return BarProgress(Console(stderr=True, no_color=_flag("no_color")))
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


# -- the readers ----------------------------------------------------------------

IMAGE_OPTION = click.option(
    "--image",
    metavar="TAG|N",
    shell_complete=complete_image,
    help="The image to use when the archive holds several: a tag, or its number from 1.",
)
JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document, and nothing else."
)


def archive_argument(name: str, metavar: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument(
        name, metavar=metavar, type=click.Path(allow_dash=True), shell_complete=complete_archive
    )


@contextlib.contextmanager
def _opened(path: str, options: Any, choice: str | None) -> Iterator[tuple[Any, Any]]:
    """The archive's source and its chosen image."""
    from .archive import open_source, read_images, select_image

    started = time.monotonic()
    with open_source(path, options) as source:
        image = select_image(read_images(source), choice, "<stdin>" if path == "-" else path)
        _verbose(f"{path}: {image.format}, {len(image.layers)} layers")
        yield source, image
    _verbose(f"{path}: read in {time.monotonic() - started:.2f} s")


def _output() -> Any:
    from .render import Output

    return Output(color=False if _flag("no_color") else None)


def _emit(
    result: dict[str, Any], as_json: bool, show: Callable[[Any, dict[str, Any]], None]
) -> None:
    """A reading command's result: one JSON document, or `show` for people."""
    out = _output()
    if as_json:
        out.json(result)
    else:
        show(out, result)


@contextlib.contextmanager
def _reading_progress(label: str, total: int) -> Iterator[Any]:
    """A rich bar on stderr while layers are read, when stderr is a terminal."""
    if _flag("quiet") or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True, no_color=_flag("no_color"))
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda ref: progress.advance(task, ref.size)


@main.command()
@archive_argument("archive", "ARCHIVE")
@IMAGE_OPTION
@click.option(
    "--files",
    "files",
    is_flag=False,
    flag_value="all",
    default=None,
    metavar="[N]",
    shell_complete=complete_layer,
    help="List the entries of layer N, or with no N the merged filesystem and each file's layer.",
)
@click.option("--tree", is_flag=True, help="Draw the files (of --files) as a tree.")
@JSON_OPTION
@common_options
def inspect(archive: str, image: str | None, files: str | None, tree: bool, as_json: bool) -> None:
    """Show an image archive's layers, digests, files and wasted space.

    ARCHIVE is a Docker or OCI archive (docker save, podman save, skopeo,
    nixpkgs, Guix, our build), an OCI layout directory, or - for standard
    input.

    \b
    Examples:
      guix-image inspect image.tar
      guix-image inspect image.tar --files 3
      guix-image inspect image.tar --files --tree
      guix-image inspect image.tar --json | jq '.layers[].diff_id'
    """
    from .inspection import layer_files, merged_files, read_layers, summarize
    from .layer_contents import FILES, PATHS

    if tree and files is None:
        raise click.UsageError("--tree draws the files: give --files (or --files N) too")
    layer_number = _layer_number(files)
    # Full records only where they are listed: the summary needs paths and sizes.
    everywhere = FILES if files == "all" or (archive == "-" and files) else PATHS
    with _opened(archive, everywhere, image) as (source, chosen):
        if layer_number is not None and not 1 <= layer_number <= len(chosen.layers):
            raise CommandError(
                f"--files {layer_number}: the image has layers 1 to {len(chosen.layers)}", 2
            )
        contents = read_layers(source, chosen, everywhere)
        if layer_number is not None and contents[layer_number - 1].files is None:
            ref = chosen.layers[layer_number - 1]
            contents[layer_number - 1] = source.read_layer(ref, FILES)
    summary = summarize(source, chosen, contents)
    listing = None
    if files is not None:
        listing = (
            merged_files(contents)
            if layer_number is None
            else layer_files(contents[layer_number - 1])
        )
    out = _output()
    if as_json:
        out.json({**summary, **({"listing": listing} if listing is not None else {})})
        return
    from . import render

    if listing is None:
        render.inspect_summary(out, summary)
    elif tree:
        label = f"layer {layer_number}" if layer_number else "merged filesystem"
        render.inspect_tree(out, listing, label)
    else:
        render.inspect_files(out, listing, with_layer=layer_number is None)


def _layer_number(files: str | None) -> int | None:
    if files is None or files == "all":
        return None
    if not (files.isascii() and files.isdigit()):
        raise CommandError(f"--files {files!r}: give a layer number (from 1) or nothing", 2)
    return int(files)


@main.command("diff-layers")
@archive_argument("archive_a", "A")
@archive_argument("archive_b", "B")
@IMAGE_OPTION
@click.option("--ignore-timestamps", is_flag=True, help="Do not compare mtimes and created times.")
@click.option("--ignore-ownership", is_flag=True, help="Do not compare uid, gid, uname and gname.")
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False),
    help="Write both versions of each modified file under DIR/a/ and DIR/b/.",
)
@JSON_OPTION
@common_options
def diff_layers(
    archive_a: str,
    archive_b: str,
    image: str | None,
    ignore_timestamps: bool,
    ignore_ownership: bool,
    report_dir: str | None,
    as_json: bool,
) -> None:
    """Compare two image archives: their layers, files and config.

    Exit status 0 when they are identical, 1 when they differ, 2 on trouble.

    \b
    Examples:
      guix-image diff-layers old.tar new.tar
      guix-image diff-layers a.tar b.tar --ignore-timestamps --json | jq .files
      guix-image diff-layers a.tar b.tar --report-dir out && diff -r out/a out/b
    """
    from .diffing import Ignore, Side, diff_images, write_report
    from .layer_contents import EVERYTHING

    if archive_a == "-" and archive_b == "-":
        raise CommandError("only one of A and B can be standard input", 2)
    if report_dir is not None and "-" in (archive_a, archive_b):
        raise CommandError("--report-dir needs both archives as files, not standard input", 2)
    ignore = Ignore(timestamps=ignore_timestamps, ownership=ignore_ownership)
    with (
        _opened(archive_a, EVERYTHING, image) as (source_a, image_a),
        _opened(archive_b, EVERYTHING, image) as (source_b, image_b),
    ):
        a, b = Side(source_a, image_a), Side(source_b, image_b)
        result, layers_a, layers_b = diff_images(a, b, ignore)
        if report_dir is not None:
            modified = {
                c["path"]
                for c in result["files"]
                if c["change"] == "modified" and any(f["field"] == "sha256" for f in c["fields"])
            }
            written = write_report(report_dir, "a", a, layers_a, modified)
            written += write_report(report_dir, "b", b, layers_b, modified)
            _verbose(f"{written} files written under {report_dir}")
    from . import render

    _emit(result, as_json, render.diff_report)
    if not result["identical"]:
        raise click.exceptions.Exit(1)


@main.command()
@archive_argument("archive", "ARCHIVE")
@IMAGE_OPTION
@click.option(
    "--rebuild",
    "rebuild_config",
    type=click.File("rb"),
    metavar="CONFIG",
    shell_complete=complete_config,
    help="Build the image again from CONFIG and compare every layer's digest.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    help="With --rebuild: read store paths under DIR (a chroot store).",
)
@click.option(
    "--against",
    metavar="OTHER",
    type=click.Path(allow_dash=True),
    shell_complete=complete_archive,
    help="Compare the digests with another archive.",
)
@JSON_OPTION
@common_options
def verify(
    archive: str,
    image: str | None,
    rebuild_config: Any,
    root: str | None,
    against: str | None,
    as_json: bool,
) -> None:
    """Check an image archive's digests against its bytes, or against a rebuild.

    Checks each layer's diff_id, each OCI blob's digest and size, the config
    digest, the layer count, duplicate and escaping paths, and truncation.
    Exit status 0 when every check passes, 1 when one fails, 2 on trouble.

    \b
    Examples:
      guix-image verify image.tar
      guix-image verify image.tar --rebuild image.json
      guix-image verify image.tar --against rebuilt.tar --json | jq .ok
    """
    from .layer_contents import DIGESTS, EVERYTHING
    from .verification import check_archive

    if rebuild_config is not None and against is not None:
        raise CommandError("give --rebuild or --against, not both", 2)
    if archive == "-" and (against == "-" or getattr(rebuild_config, "name", "") == "<stdin>"):
        raise CommandError("only one input can be standard input", 2)
    comparing = rebuild_config is not None or against is not None
    with _opened(archive, EVERYTHING if comparing else DIGESTS, image) as (source, chosen):
        total = sum(ref.size for ref in chosen.layers)
        with _reading_progress("hashing", total) as advance:
            checks, _ = check_archive(source, chosen, on_layer=advance)
        if rebuild_config is not None:
            mismatch = _verify_rebuild(source, chosen, rebuild_config, root, checks)
        elif against is not None:
            mismatch = _verify_against(source, chosen, against, image, checks)
        else:
            mismatch = None
    result: dict[str, Any] = {
        "ok": all(c.ok for c in checks),
        "checks": [c.to_json() for c in checks],
    }
    if mismatch is not None:
        result["mismatch"] = mismatch
    from . import render

    _emit(result, as_json, render.verify_report)
    if not result["ok"]:
        raise click.exceptions.Exit(1)


def _verify_rebuild(
    source: Any, image: Any, config_file: Any, root: str | None, checks: list[Any]
) -> Any:
    from .build import build_image
    from .config import parse_config
    from .verification import compare_images, read_rebuild

    config = parse_config(config_file.read(), source=config_file.name)
    rebuilt, rebuilt_source = read_rebuild(lambda fd: build_image(config, fd, root=root))
    new_checks, mismatch = compare_images("rebuild", source, image, rebuilt_source, rebuilt)
    checks.extend(new_checks)
    return mismatch


def _verify_against(
    source: Any, image: Any, other_path: str, choice: str | None, checks: list[Any]
) -> Any:
    from .layer_contents import EVERYTHING
    from .verification import compare_images

    with _opened(other_path, EVERYTHING, choice) as (other_source, other):
        new_checks, mismatch = compare_images("against", source, image, other_source, other)
    checks.extend(new_checks)
    return mismatch


# -- completion -----------------------------------------------------------------


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


if __name__ == "__main__":  # pragma: no cover
    main()
