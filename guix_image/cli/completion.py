"""Shell completion: the scripts (Click's own), and what each argument completes to.

Completions run in a fresh process for every Tab, so they import little and
never fail loudly: a problem just means no suggestions.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_GUIX_IMAGE_COMPLETE"
PROG_NAME = "guix-image"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".oci", ".docker")
SCRIPT_FILES = {"bash": "guix-image.bash", "zsh": "_guix-image", "fish": "guix-image.fish"}


def completion_script(cli: click.Command, shell: str) -> str:
    """The completion script for `shell`, as `_GUIX_IMAGE_COMPLETE=<shell>_source` prints it."""
    completion_class = get_completion_class(shell)
    if completion_class is None:
        raise click.BadParameter(f"unknown shell {shell!r}; choose from {', '.join(SHELLS)}")
    return completion_class(cli, {}, PROG_NAME, COMPLETE_VAR).source() + "\n"


def _entries(incomplete: str) -> list[tuple[str, bool]]:
    """(path, is_directory) for the directory entries that start with `incomplete`."""
    directory, _, prefix = incomplete.rpartition("/")
    listing = directory or "."
    if incomplete.startswith("/") and not directory:
        listing = "/"
    try:
        names = sorted(os.listdir(os.path.expanduser(listing)))
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(prefix) and (prefix.startswith(".") or not name.startswith(".")):
            path = f"{directory}/{name}" if directory or incomplete.startswith("/") else name
            found.append((path, os.path.isdir(os.path.expanduser(path))))
    return found


def _paths(incomplete: str, wanted: Any) -> list[CompletionItem]:
    """Paths `wanted` accepts, or, when none match, the shell's own file completion."""
    matches = [path for path, is_dir in _entries(incomplete) if wanted(path, is_dir)]
    if matches:
        return [CompletionItem(path) for path in matches]
    return [CompletionItem(incomplete, type="file")]


def complete_archive(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Image archives: tar files and OCI layout directories."""

    def wanted(path: str, is_dir: bool) -> bool:
        if is_dir:
            return os.path.exists(os.path.join(os.path.expanduser(path), "oci-layout"))
        return path.endswith(ARCHIVE_SUFFIXES)

    return _paths(incomplete, wanted)


def complete_config(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Build configs: JSON files."""
    return _paths(incomplete, lambda path, is_dir: not is_dir and path.endswith(".json"))


def _archive_of(ctx: click.Context) -> str | None:
    for name in ("archive", "archive_a"):
        value = ctx.params.get(name)
        if isinstance(value, str) and value != "-":
            return value
    return _archive_from_words(ctx)


def _archive_from_words(ctx: click.Context) -> str | None:
    """The first argument on the command line being completed.

    Click cannot parse a line that ends with an option still waiting for its
    value (`inspect app.tar --image <Tab>`), so read the words themselves.
    """
    import shlex

    try:
        words = shlex.split(os.environ.get("COMP_WORDS", ""))
    except ValueError:
        return None
    takes_value = {
        opt
        for param in ctx.command.params
        if isinstance(param, click.Option) and not param.is_flag
        for opt in param.opts
    }
    arguments = []
    skip = False
    for word in words[2:]:  # after the program and the command
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            arguments.append(word)
    return arguments[0] if arguments else None


def _images(ctx: click.Context) -> list[Any]:
    path = _archive_of(ctx)
    if path is None:
        return []
    from ..formats.images import read_images
    from ..formats.layer_tar import HEADERS
    from ..formats.sources import open_source

    with contextlib.suppress(Exception), open_source(path, HEADERS) as source:
        return read_images(source)
    return []


def complete_image(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The tags and numbers of the images in the archive given before."""
    items = []
    for number, image in enumerate(_images(ctx), 1):
        label = f"image {number}, {len(image.layers)} layers"
        for tag in image.repo_tags:
            items.append(CompletionItem(tag, help=label))
        items.append(CompletionItem(str(number), help=", ".join(image.repo_tags) or label))
    return [item for item in items if item.value.startswith(incomplete)]


def complete_layer(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The layer numbers of the (first, or chosen) image in the archive given before."""
    images = _images(ctx)
    if not images:
        return []
    image = images[0]
    choice = ctx.params.get("image")
    if (
        isinstance(choice, str)
        and choice.isascii()
        and choice.isdigit()
        and 0 < int(choice) <= len(images)
    ):
        image = images[int(choice) - 1]
    history = image.layer_history()
    items = []
    for layer, entry in zip(image.layers, history, strict=True):
        comment = (entry.get("comment") or entry.get("created_by") or "")[:60]
        items.append(
            CompletionItem(str(layer.index), help=f"{(layer.diff_id or '')[:19]} {comment}".strip())
        )
    return [item for item in items if item.value.startswith(incomplete)]
