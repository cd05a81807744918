"""The reading commands: `inspect`, `diff-layers` and `verify`."""

from __future__ import annotations

import functools
from typing import Any

import click

from .completion import complete_archive, complete_config, complete_layer
from .options import (
    IMAGE_OPTION,
    JSON_OPTION,
    PLATFORM_OPTION,
    CommandError,
    archive_argument,
    common_options,
    emit,
    flag,
    note,
    opened,
    output,
    reading_progress,
    verbose,
)


@click.command()
@click.argument(
    "archive",
    metavar="ARCHIVE",
    required=False,  # `--files ARCHIVE` takes it for N: see _files_and_archive
    type=click.Path(allow_dash=True),
    shell_complete=complete_archive,
)
@IMAGE_OPTION
@PLATFORM_OPTION
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
@click.option(
    "--ci",
    is_flag=True,
    help="Judge the wasted space by dive's CI rules (from .dive-ci if there is one): "
    "PASS or FAIL per rule, exit 1 on a failure.",
)
@click.option(
    "--ci-config",
    type=click.Path(dir_okay=False, exists=True),
    help="With --ci: the rules file (dive's format), instead of ./.dive-ci.",
)
@click.option("--lowest-efficiency", metavar="FRACTION", help="With --ci: fail below it.")
@click.option("--highest-wasted-bytes", metavar="SIZE", help="With --ci: fail at it (20MB, ...).")
@click.option(
    "--highest-user-wasted-percent",
    metavar="FRACTION",
    help="With --ci: fail at this share of the bytes the layers above the first add.",
)
@JSON_OPTION
@common_options
def inspect(
    archive: str | None,
    image: str | None,
    platform: str | None,
    files: str | None,
    tree: bool,
    ci: bool,
    ci_config: str | None,
    lowest_efficiency: str | None,
    highest_wasted_bytes: str | None,
    highest_user_wasted_percent: str | None,
    as_json: bool,
) -> None:
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
      guix-image inspect image.tar --ci --lowest-efficiency 0.95
    """
    from ..analysis.inspect import ALL, inspect_image, read_options

    archive, files = _files_and_archive(archive, files)
    if tree and files is None:
        raise click.UsageError("--tree draws the files: give --files (or --files N) too")
    given = {
        "lowestEfficiency": lowest_efficiency,
        "highestWastedBytes": highest_wasted_bytes,
        "highestUserWastedPercent": highest_user_wasted_percent,
    }
    rules = {name: value for name, value in given.items() if value is not None}
    if (rules or ci_config) and not ci:
        raise click.UsageError("the rule options go with --ci")
    if ci and files is not None:
        raise click.UsageError("--ci judges the waste: give it without --files")
    if ci:
        rules = {**_ci_rules(ci_config), **rules}
    listed = _layer_number(files) if files not in (None, "all") else files
    with opened(archive, read_options(listed, from_stream=True), image, platform) as (
        source,
        chosen,
    ):
        if isinstance(listed, int) and not 1 <= listed <= len(chosen.layers):
            raise CommandError(
                f"--files {listed}: the image has layers 1 to {len(chosen.layers)}", 2
            )
        report = inspect_image(source, chosen, listed)
        for warning in report.warnings:
            note(f"warning: {warning} (see `guix-image verify`)")
    from . import render

    if ci:
        from ..analysis.ci import evaluate

        verdict = evaluate(report, rules)
        emit(verdict, as_json, render.ci_report)
        if not verdict.ok:
            raise click.exceptions.Exit(1)
    elif as_json and report.listing is not None:
        items = (entry.to_json() for entry in report.listing)
        output().json_streamed(report.summary_json(), "listing", items)
    elif as_json or report.listing is None:
        emit(report, as_json, render.inspect_summary)
    elif tree:
        label = "merged filesystem" if listed == ALL else f"layer {listed}"
        render.inspect_tree(output(), report.listing, label)
    else:
        render.inspect_files(output(), report.listing, with_layer=listed == ALL)


def _files_and_archive(archive: str | None, files: str | None) -> tuple[str, str | None]:
    """`inspect --files image.tar`: the option's optional N took the archive's name."""
    if archive is None and files not in (None, "all") and not str(files).isdigit():
        return str(files), "all"
    if archive is None:
        raise click.UsageError("Missing argument 'ARCHIVE'.")
    return archive, files


def _ci_rules(path: str | None) -> dict[str, str]:
    """The rules of the given file, or of ./.dive-ci if there is one."""
    import os

    from ..analysis.ci import read_rules
    from ..files import read_regular

    if path is None and not os.path.exists(".dive-ci"):
        return {}
    where = path or ".dive-ci"
    try:
        text = read_regular(where, 1 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"{where}: cannot read it: {error}", 2) from None
    return read_rules(text, where)


def _layer_number(files: str | None) -> int:
    assert files is not None
    if not (files.isascii() and files.isdigit()):
        raise CommandError(f"--files {files!r}: give a layer number (from 1) or nothing", 2)
    return int(files)


@click.command("diff-layers")
@archive_argument("archive_a", "A")
@archive_argument("archive_b", "B")
@IMAGE_OPTION
@PLATFORM_OPTION
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
    platform: str | None,
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
    from ..analysis.diff import (
        READ_OPTIONS,
        Ignore,
        Side,
        diff_images,
        write_metadata_changes,
        write_report,
    )

    if archive_a == "-" and archive_b == "-":
        raise CommandError("only one of A and B can be standard input", 2)
    _refuse_one_pipe_twice(archive_a, archive_b)
    if report_dir is not None and "-" in (archive_a, archive_b):
        raise CommandError("--report-dir needs both archives as files, not standard input", 2)
    ignore = Ignore(timestamps=ignore_timestamps, ownership=ignore_ownership)
    with (
        opened(archive_a, READ_OPTIONS, image, platform) as (source_a, image_a),
        opened(archive_b, READ_OPTIONS, image, platform) as (source_b, image_b),
    ):
        a, b = Side(source_a, image_a), Side(source_b, image_b)
        report, layers_a, layers_b = diff_images(a, b, ignore)
        if report_dir is not None:
            modified = report.modified_contents()
            written = write_report(report_dir, "a", a, layers_a, modified)
            written += write_report(report_dir, "b", b, layers_b, modified)
            metadata = write_metadata_changes(report_dir, report)
            verbose(f"{written} files and {metadata} metadata changes written under {report_dir}")
    from . import render

    emit(report, as_json, functools.partial(render.diff_report, differences_only=flag("quiet")))
    if not report.identical:
        raise click.exceptions.Exit(1)


@click.command()
@archive_argument("archive", "ARCHIVE")
@IMAGE_OPTION
@PLATFORM_OPTION
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
@click.option(
    "--store",
    "store_dir",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[DIR]",
    type=click.Path(file_okay=False),
    help="Check every store item against the store's database: NAR hashes, references "
    "(DIR: the store directory, by default the one the image holds).",
)
@click.option(
    "--db",
    "database",
    type=click.Path(dir_okay=False, exists=True),
    help="With --store: the store database (by default the Guix or Nix one of DIR).",
)
@JSON_OPTION
@common_options
def verify(
    archive: str,
    image: str | None,
    platform: str | None,
    rebuild_config: Any,
    root: str | None,
    against: str | None,
    store_dir: str | None,
    database: str | None,
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
      guix-image verify image.tar --store               # against /gnu/store's database
    """
    from ..analysis import verify as checking

    if rebuild_config is not None and against is not None:
        raise CommandError("give --rebuild or --against, not both", 2)
    if database is not None and store_dir is None:
        raise CommandError("--db goes with --store", 2)
    if archive == "-" and (against == "-" or getattr(rebuild_config, "name", "") == "<stdin>"):
        raise CommandError("only one input can be standard input", 2)
    if against is not None:
        _refuse_one_pipe_twice(archive, against)
    from ..errors import ArchiveError

    options = checking.read_options(comparing=rebuild_config is not None or against is not None)
    # A damaged archive (truncated, a blob missing) is a failed check, not trouble.
    try:
        with opened(archive, options, image, platform) as (source, chosen):
            total = sum(layer.size for layer in chosen.layers)
            with reading_progress("hashing", total) as advance:
                verdict = checking.check_archive(source, chosen, on_layer=advance)
            if store_dir is not None:
                from ..analysis.store_check import check_against_store

                stored = check_against_store(source, chosen, store_dir or None, database)
                verdict.checks.extend(stored)
            if rebuild_config is not None:
                build = _rebuild(rebuild_config, root, chosen)
                checking.compare_with_rebuild(verdict, chosen, build)
            elif against is not None:
                try:
                    with opened(against, options, image, platform) as (other_source, other):
                        checking.check_other(verdict, other_source, other)
                        checking.compare_images(verdict, "against", chosen, other)
                except ArchiveError as error:
                    verdict.checks.extend(checking.unreadable(error, "other archive").checks)
    except ArchiveError as error:
        verdict = checking.unreadable(error)
    from . import render

    emit(verdict, as_json, functools.partial(render.verify_report, failures_only=flag("quiet")))
    if not verdict.ok:
        raise click.exceptions.Exit(1)


def _rebuild(config_file: Any, root: str | None, image: Any) -> Any:
    """A function that builds CONFIG again into a file descriptor, as `image` was
    built: an OCI image as an oci-archive, its layers compressed as its own were."""
    from ..build.config import parse_config
    from ..build.engine import build_image
    from ..build.oci import OciOutput, compression_of

    config = parse_config(config_file.read(), source=config_file.name)
    if image.layers and all(layer.digest is not None for layer in image.layers):
        compression = compression_of(image.layers)
        return lambda fd: build_image(
            config, OciOutput("oci-archive", fd, compression, mtime=config.mtime), root=root
        )
    return lambda fd: build_image(config, fd, root=root)


def _refuse_one_pipe_twice(first: str, second: str) -> None:
    """A pipe (a FIFO, `<(...)`) can be read once: given twice, the second read would wait
    for ever."""
    import os
    import stat

    try:
        same = os.path.samefile(first, second)
        mode = os.stat(first).st_mode
    except (OSError, ValueError):
        return  # not there, or "-": the readers say so
    if same and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CommandError(f"{first} and {second} are one pipe, which can be read only once", 2)
