"""`guix-image build`: the command, its progress and its report on stderr."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click

from .completion import complete_config
from .options import CommandError, common_options, flag, no_color, note, verbose


def _image_options() -> list[Any]:
    """The options that shape an image of store items (build and push take them)."""
    return [
        click.option(
            "--store-dir", metavar="DIR", help="The store directory (by default the items')."
        ),
        click.option(
            "--db",
            type=click.Path(dir_okay=False, exists=True),
            help="The store database (by default the Guix or Nix one of the store).",
        ),
        click.option(
            "--references",
            type=click.Path(dir_okay=False, exists=True),
            help="The closure from an exportReferencesGraph JSON file instead of the database.",
        ),
        click.option(
            "--max-layers",
            type=click.IntRange(1, 125),
            default=100,
            show_default=True,
            help="Layers in all, a base image's included.",
        ),
        click.option(
            "--strategy",
            type=click.Choice(["auto", "popularity", "size"]),
            default="auto",
            show_default=True,
            help="How store items are spread over layers.",
        ),
        click.option("--entrypoint", metavar="CMD", help="Entrypoint: a JSON list, or words."),
        click.option("--cmd", metavar="CMD", help="Cmd: a JSON list, or words."),
        click.option(
            "--env", metavar="K=V", multiple=True, help="An environment variable (repeatable)."
        ),
        click.option("--workdir", metavar="DIR", help="The working directory."),
        click.option("--label", metavar="K=V", multiple=True, help="A label (repeatable)."),
        click.option("--user", metavar="USER", help="The user to run as."),
        click.option(
            "--expose", metavar="PORT[/PROTO]", multiple=True, help="A port to expose (repeatable)."
        ),
        click.option(
            "--architecture", metavar="ARCH", help="Go/OCI name (default: this machine's)."
        ),
        click.option(
            "--created",
            metavar="TIME",
            help="ISO 8601, or now (SOURCE_DATE_EPOCH); default 1970-01-01T00:00:01Z.",
        ),
        click.option(
            "--mtime", metavar="TIME", help="Time stamped on every file (default: --created)."
        ),
        click.option(
            "--from-image", type=click.Path(exists=True), help="A base image archive or layout."
        ),
        click.option(
            "-S",
            "--symlink",
            metavar="LINK=TARGET",
            multiple=True,
            help="A link in the image into the first item, as /bin=bin (repeatable).",
        ),
        click.option(
            "--add",
            metavar="SRC:DEST",
            multiple=True,
            help="A host file or directory copied to DEST in the image (repeatable).",
        ),
    ]


def items_options(function: Any) -> Any:
    """The options of `push STORE_ITEM... REF` (refused with a CONFIG)."""
    for option in reversed(_image_options()):
        function = option(function)
    return function


def optgroup_items(function: Any) -> Any:
    """The options of `build STORE_ITEM...` (refused with a CONFIG)."""
    shaping = _image_options()
    dry_run = [
        click.option(
            "--print-layers",
            is_flag=True,
            help="Print the planned layers and stop (--json for JSON).",
        ),
        click.option(
            "--emit-config",
            type=click.Path(dir_okay=False),
            help="Write the equivalent CONFIG to FILE and stop.",
        ),
        click.option("--json", is_flag=True, help="With --print-layers: JSON."),
        click.option(
            "--sbom",
            type=click.Path(dir_okay=False),
            help="Write a CycloneDX 1.5 SBOM of the store items to FILE.",
        ),
    ]
    for option in reversed(shaping[:-2] + dry_run + shaping[-2:]):  # the order of --help
        function = option(function)
    return function


@click.command()
@click.argument(
    "sources",
    metavar="CONFIG | STORE_ITEM...",
    nargs=-1,
    type=click.Path(allow_dash=True),
    shell_complete=complete_config,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(allow_dash=True),
    help="Write the archive to FILE, atomically, instead of standard output "
    "(the layout directory, for --format oci-dir).",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["docker-archive", "oci-archive", "oci-dir"]),
    default="docker-archive",
    show_default=True,
    help="A Docker archive (docker load), an OCI layout in one tar (podman load, "
    "skopeo oci-archive:), or an OCI layout directory (oci:DIR), which keeps its other images.",
)
@click.option(
    "--compress",
    type=click.Choice(["none", "gzip", "zstd"]),
    help="How OCI layers are compressed, reproducibly (default: gzip, which every "
    "registry and runtime reads).",
)
@click.option(
    "--compress-level",
    type=int,
    metavar="N",
    help="gzip 1-9 (default 2; 1-3 by ISA-L, 4-9 by zlib), zstd 1-19 (default 3).",
)
@click.option(
    "-t",
    "--tag",
    "tags",
    metavar="NAME[:TAG]",
    multiple=True,
    help="Image name, overriding repo_tag (NAME alone is NAME:latest); again for more names.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    help="Read store paths under DIR, as for a chroot store (nix --store DIR).",
)
@click.option("--example", is_flag=True, help="Build the built-in example image; needs no CONFIG.")
@click.option(
    "--platform-image",
    "platform_images",
    metavar="ARCH=CONFIG",
    multiple=True,
    help="With an OCI --format: the image for ARCH, built from CONFIG, in one index "
    "of an image per platform (repeatable; with --example: ARCH alone).",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither use nor update the layer cache ($XDG_CACHE_HOME/guix-image).",
)
@optgroup_items
@common_options
def build(
    sources: tuple[str, ...],
    output: str | None,
    tags: tuple[str, ...],
    root: str | None,
    example: bool,
    platform_images: tuple[str, ...],
    no_cache: bool,
    image_format: str,
    compress: str | None,
    compress_level: int | None,
    **items_options: Any,
) -> None:
    """Stream an image archive of store items (Docker's, or OCI with compressed
    layers): the closure of STORE_ITEMs, layered, or the layers a CONFIG describes.

    STORE_ITEM is a store item (/gnu/store/...-hello-2.12, or a `result` link
    to one): its closure comes from the store's database (or --references, or
    nix-store), spread over at most --max-layers layers by --strategy. CONFIG
    is the JSON file of nixpkgs' streamLayeredImage and Guix's
    stream-layered-image.py, or - for standard input. The archive loads with
    `docker load` and `podman load`; --format oci-archive or oci-dir writes an
    OCI layout for skopeo, umoci and registries. The same inputs and store
    always give the same bytes.

    \b
    Examples:
      guix-image build --example -o example.tar
      guix-image build $(guix build hello) -S /bin=bin --entrypoint /bin/hello -o hi.tar
      guix-image build ./result --print-layers
      guix-image build image.json | docker load
      guix-image build image.json -t app:1.0 -o app.tar
      guix-image build image.json --format oci-dir --compress zstd -o layout
    """
    from ..build.config import parse_config, validate_config

    destination = _destination(output, image_format, compress, compress_level)
    if platform_images:
        _refuse_items_options(items_options, have_items=False)
        if sources:
            raise click.UsageError("give CONFIGs with --platform-image ARCH=CONFIG, not apart")
        _build_platforms(platform_images, destination, tags, root, example, no_cache)
        return
    repo_tag, extra_tags = (tags[0], tags[1:]) if tags else (None, ())
    store_dir = items_options["store_dir"]
    items = _store_items(sources, store_dir)
    given = bool(sources) or example
    if not given or (example and sources):
        raise click.UsageError("give CONFIG, STORE_ITEMs or --example")
    if items is None and len(sources) > 1:
        raise click.UsageError(
            f"{sources[1]!r}: one CONFIG, or store items only (not in {store_dir or 'a store'})"
        )
    architecture = items_options["architecture"]
    if example:  # the one option --example takes: which program its image holds
        items_options = {**items_options, "architecture": None}
    _refuse_items_options(items_options, items is not None)
    if example and root is not None:
        raise click.UsageError("--root reads a store for CONFIG; --example makes its own")
    if items is not None:
        with _customisation_directory(items_options) as customisation:
            _build_items(items, tags, destination, root, no_cache, customisation, items_options)
        return
    _refuse_terminal(destination)
    with _example_root() if example else contextlib.nullcontext(None) as example_root:
        if example_root is not None:
            from ..build.example import ARCHITECTURES, make_example_store
            from ..build.items import this_architecture

            architecture = architecture or this_architecture()
            if architecture not in ARCHITECTURES:
                raise CommandError(
                    f"the example has a program for {' and '.join(ARCHITECTURES)}, "
                    f"not {architecture}: give --architecture",
                    2,
                )

            config = validate_config(
                make_example_store(example_root, architecture),
                source="example",
                repo_tag=repo_tag,
                extra_tags=extra_tags,
            )
            root = example_root
        else:
            text, name = _read_config(sources[0])
            config = parse_config(text, source=name, repo_tag=repo_tag, extra_tags=extra_tags)
        for warning in config.warnings:
            note(f"warning: {warning}")
        _run_build(config, destination, root, use_cache=not no_cache and not example)


def _build_platforms(
    platform_images: tuple[str, ...],
    destination: Destination,
    tags: tuple[str, ...],
    root: str | None,
    example: bool,
    no_cache: bool,
) -> None:
    """One image per ARCH=CONFIG (or per ARCH, of the example), in one index."""
    from ..build.config import parse_config, validate_config

    if destination.image_format == "docker-archive":
        raise click.UsageError("--platform-image needs --format oci-archive or oci-dir")
    repo_tag, extra_tags = (tags[0], tags[1:]) if tags else (None, ())
    with contextlib.ExitStack() as stack:
        builds: list[tuple[Any, str | None]] = []
        for value in platform_images:
            architecture, equals, config_path = value.partition("=")
            if example:
                from ..build.example import ARCHITECTURES, make_example_store

                if equals:
                    raise click.BadParameter(f"{value!r}: with --example, give ARCH alone")
                if architecture not in ARCHITECTURES:
                    raise click.BadParameter(
                        f"the example has a program for {' and '.join(ARCHITECTURES)}, "
                        f"not {architecture}"
                    )
                example_root = stack.enter_context(_example_root())
                document = make_example_store(example_root, architecture)
                config = validate_config(
                    document, source="example", repo_tag=repo_tag, extra_tags=extra_tags
                )
                builds.append((config, example_root))
                continue
            if not equals or not config_path:
                raise click.BadParameter(f"{value!r} is not ARCH=CONFIG")
            text, name = _read_config(config_path)
            config = parse_config(text, source=name, repo_tag=repo_tag, extra_tags=extra_tags)
            if config.architecture != architecture:
                raise CommandError(
                    f"{value}: {name} builds for {config.architecture}, not {architecture}", 2
                )
            builds.append((config, root))
        _refuse_terminal(destination)
        names = builds[0][0].repo_tags  # -t's, as names are read (app: app:latest)
        _run_build(builds, destination, root, use_cache=not no_cache and not example, names=names)


def _build_items(
    items: list[str],
    tags: tuple[str, ...],
    destination: Destination,
    root: str | None,
    no_cache: bool,
    customisation: str | None,
    options: dict[str, Any],
) -> None:
    from ..build.config import validate_config

    repo_tag, extra_tags = (tags[0], tags[1:]) if tags else (None, ())
    plan = _plan_items(items, repo_tag, root, customisation, options)
    if options["print_layers"] or options["emit_config"]:
        _write_sbom(plan, options["sbom"], repo_tag)
        return
    config = validate_config(
        plan.document, source="store items", repo_tag=repo_tag, extra_tags=extra_tags
    )
    for warning in config.warnings:
        note(f"warning: {warning}")
    _refuse_terminal(destination)
    _run_build(config, destination, root, use_cache=not no_cache)
    _write_sbom(plan, options["sbom"], config.repo_tag)


@contextlib.contextmanager
def _customisation_directory(options: dict[str, Any]) -> Iterator[str | None]:
    """Where --symlink and --add make their layer: beside an emitted CONFIG (which
    names it), else a temporary directory, removed after the build."""
    if not (options["symlink"] or options["add"]):
        yield None
    elif options.get("emit_config"):
        yield os.path.abspath(options["emit_config"]) + ".customisation"
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="guix-image-customisation-") as directory:
            yield directory


@dataclass(frozen=True)
class Destination:
    """Where the image goes (None or "-": standard output), and in which format."""

    path: str | None
    image_format: str
    compression: Any  # formats.compression.Compression, for the OCI formats

    @property
    def to_stdout(self) -> bool:
        return self.path in (None, "-")


def _destination(
    output: str | None, image_format: str, compress: str | None, level: int | None
) -> Destination:
    from ..errors import InputError
    from ..formats.compression import choose

    if image_format == "docker-archive":
        if compress is not None or level is not None:
            raise click.UsageError(
                "--compress goes with --format oci-archive or oci-dir "
                "(a Docker archive's layers are uncompressed tars)"
            )
        compression = None
    else:
        try:
            compression = choose(compress or "gzip", level)
        except InputError as error:
            raise click.BadParameter(str(error), param_hint="--compress-level") from None
    if image_format == "oci-dir" and output in (None, "-"):
        raise click.UsageError("--format oci-dir writes a directory: give it with -o DIR")
    if image_format != "oci-dir" and output not in (None, "-") and os.path.isdir(output):
        raise CommandError(f"output {output} is a directory (for a layout: --format oci-dir)", 2)
    return Destination(output, image_format, compression)


def _refuse_terminal(destination: Destination) -> None:
    from .streams import CLOSED

    if not destination.to_stdout:
        return
    if 1 in CLOSED:
        raise CommandError("standard output is closed; use -o FILE", 2)
    if sys.stdout.isatty():
        raise CommandError(
            "refusing to write an image archive to a terminal; use -o FILE or a pipe", 2
        )


def _read_config(source: str) -> tuple[bytes, str]:
    if source == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    from ..files import read_regular

    try:
        return read_regular(source, 64 << 20), source
    except OSError as error:
        raise CommandError(f"{source}: {error.strerror or error}", 2) from None


def _store_items(sources: tuple[str, ...], store_dir: str | None) -> list[str] | None:
    """The store items the arguments name, or None if they name a CONFIG."""
    from ..store.paths import store_item

    found = [store_item(source, store_dir) for source in sources]
    if not sources or any(item is None for item in found):
        if len(sources) > 1 and any(item is not None for item in found):
            bad = next(s for s, item in zip(sources, found, strict=True) if item is None)
            raise CommandError(f"{bad}: not a store item (not directly in a store directory)", 2)
        return None
    return [item for item in found if item is not None]


def _refuse_items_options(options: dict[str, Any], have_items: bool) -> None:
    if have_items:
        return
    defaults = {param.name: param.default for param in click.get_current_context().command.params}
    for name, value in options.items():
        if value not in (None, False, (), defaults.get(name)):
            flag_name = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag_name} goes with STORE_ITEMs, not with a CONFIG")


def _plan_items(
    items: list[str],
    tag: str | None,
    root: str | None,
    customisation: str | None,
    options: dict[str, Any],
) -> Any:
    from ..build.items import ImageSettings, plan_items

    settings = ImageSettings(
        tag=tag,
        entrypoint=options["entrypoint"],
        cmd=options["cmd"],
        env=list(options["env"]),
        workdir=options["workdir"],
        labels=list(options["label"]),
        user=options["user"],
        expose=list(options["expose"]),
        architecture=options["architecture"],
        created=options["created"],
        mtime=options["mtime"],
        from_image=options["from_image"],
        symlinks=list(options["symlink"]),
        adds=list(options["add"]),
    )
    plan = plan_items(
        items,
        settings,
        store_dir=options["store_dir"],
        database=options["db"],
        references=options["references"],
        max_layers=options["max_layers"],
        strategy=options["strategy"],
        root=root,
        customisation=customisation,
    )
    if options.get("emit_config"):
        import json

        from ..build.output import write_atomically

        write_atomically(options["emit_config"], json.dumps(plan.document, indent=2) + "\n")
    if options.get("print_layers"):
        _print_layers(plan, options["json"])
    return plan


def _write_sbom(plan: Any, path: str | None, repo_tag: str | None) -> None:
    """The SBOM, once the image is there (or planned, in a dry run)."""
    if path is None:
        return
    from ..build.sbom import sbom_document, write_sbom
    from ..store.database import StoreDatabase

    database = StoreDatabase(plan.database) if plan.database else None
    try:
        document = {**plan.document, "repo_tag": repo_tag or plan.document["repo_tag"]}
        write_sbom(path, sbom_document(plan.graph, document, database))
    finally:
        if database is not None:
            database.close()
    verbose(f"SBOM of {len(plan.graph.items)} store items written to {path}")


def _print_layers(plan: Any, as_json: bool) -> None:
    from .options import output
    from .units import human_size

    layers = [
        {
            "index": plan.base_layers + number,
            "items": layer,
            "size": sum(plan.graph.sizes[item] for item in layer),
        }
        for number, layer in enumerate(plan.layers, 1)
    ]
    out = output()
    if as_json:
        out.json({"base_layers": plan.base_layers, "layers": layers})
        return
    rows = [
        [
            str(layer["index"]),
            human_size(layer["size"]),
            str(len(layer["items"])),
            layer["items"][0],
        ]
        for layer in layers
    ]
    out.table(["LAYER", "SIZE", "ITEMS", "FIRST ITEM"], rows)


def _run_build(
    config: Any,
    destination: Destination,
    root: str | None,
    *,
    use_cache: bool,
    names: list[str] | None = None,
) -> None:
    """Build `config` (or, given `names`, each (config, root) of the list `config`
    into one index under `names`) to the destination, and report."""
    from ..build.cache import LayerCache, default_directory
    from ..build.engine import build_image
    from ..build.output import atomic_output, terminate_on_signals
    from ..build.store_layer import StaleCacheEntry

    def warn(message: str) -> None:
        note(f"warning: {message}")

    cache = LayerCache(default_directory(), warn) if use_cache else None
    progress = _build_progress()
    options = {"root": root, "progress": progress, "cache": cache}
    output = destination.path
    started = time.monotonic()
    from .units import counted, human_size

    def build_to(target: Any) -> Any:
        if names is None:
            return build_image(config, _image_output(destination, target, config, cache), **options)
        from ..build.engine import build_index

        oci = _image_output(destination, target, config[0][0], cache)
        options.pop("root", None)
        results = build_index(config, oci, names, **options)
        return _IndexResult(oci.index_digest, names, results, oci.bytes_written)

    try:
        with terminate_on_signals():
            if destination.image_format == "oci-dir":
                try:
                    result = build_to(output)
                except StaleCacheEntry as error:
                    verbose(f"{error.args[0].split(';')[0]}; building again without it")
                    result = build_to(output)
            elif destination.to_stdout:  # what was streamed cannot be taken back
                result = build_to(_stdout_sink())
            else:
                assert output is not None
                try:
                    with atomic_output(output) as fd:
                        result = build_to(fd)
                except StaleCacheEntry as error:
                    # The store changed under a cached layer: its entry is dropped;
                    # into a file, the build starts again (nothing was written).
                    verbose(f"{error.args[0].split(';')[0]}; building again without it")
                    with atomic_output(output) as fd:
                        result = build_to(fd)
    finally:
        progress.close()
    where = f" to {output}" if not destination.to_stdout else ""
    if isinstance(result, _IndexResult):
        note(
            f"Done: index {result.index_digest} ({', '.join(result.names) or 'no tag'}), "
            f"{counted(len(result.results), 'image')}, {human_size(result.bytes_written)}{where}"
        )
        for image in result.results:
            verbose(f"image {image.image_id}: manifest {image.manifest_digest}")
        return
    for layer in result.layers:
        state = "cached digest confirmed" if layer.cached else "hashed"
        if layer.listed:
            state += ", files from the cached member list"
        verbose(f"layer {layer.number}: {layer.diff_id}, {layer.size} bytes ({state})")
        if layer.blob is not None and layer.blob.digest != layer.diff_id:
            verbose(f"  blob {layer.blob.digest}, {layer.blob.size} bytes ({layer.blob.label})")

    manifest = f", manifest {result.manifest_digest}" if result.manifest_digest else ""
    note(
        f"Done: {result.image_id} ({', '.join(result.repo_tags) or 'no tag'}){manifest}, "
        f"{counted(len(result.layers), 'layer')}, {human_size(result.bytes_written)}{where}"
    )
    pipeline = "in a forked process" if result.forked else "on threads of this process"
    verbose(f"{time.monotonic() - started:.2f} s; hashed and written {pipeline}")


@dataclass
class _IndexResult:
    index_digest: str | None
    names: list[str]
    results: list[Any]
    bytes_written: int


def _image_output(destination: Destination, target: Any, config: Any, cache: Any) -> Any:
    """What build_image writes to: `target` (a descriptor, a function or a
    directory) in the destination's format."""
    if destination.image_format == "docker-archive":
        return target
    from ..build.oci import OciOutput

    return OciOutput(
        destination.image_format,
        target,
        destination.compression,
        kept_blobs=cache.blobs if cache is not None else None,
        mtime=config.mtime,
    )


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

        return BarProgress(Console(stderr=True, no_color=no_color()))
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
