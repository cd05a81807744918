"""`guix-image push`: an image, built or read, into a registry."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from .build import items_options
from .completion import complete_archive
from .options import (
    IMAGE_OPTION,
    JSON_OPTION,
    PLATFORM_OPTION,
    CommandError,
    common_options,
    flag,
    note,
    opened,
    output,
)


@click.command()
@click.argument(
    "sources", metavar="SOURCE | STORE_ITEM...", nargs=-1, shell_complete=complete_archive
)
@click.argument("ref", metavar="REF")
@IMAGE_OPTION
@PLATFORM_OPTION
@click.option(
    "--compress",
    type=click.Choice(["gzip", "zstd", "none"]),
    default="gzip",
    show_default=True,
    help="How layers built from a CONFIG are compressed (see build).",
)
@click.option(
    "--from-repo",
    metavar="NAME",
    help="Mount blobs the registry has in repository NAME instead of uploading them "
    "(without it: from where earlier pushes put them).",
)
@click.option(
    "--insecure", is_flag=True, help="Plain HTTP to a registry that is not on this machine."
)
@click.option(
    "--tls-verify",
    type=click.BOOL,
    default=True,
    show_default=True,
    metavar="BOOL",
    help="Check the registry's TLS certificate (--tls-verify=false for a test registry).",
)
@click.option(
    "--cert-dir",
    type=click.Path(file_okay=False, exists=True),
    help="Trust the certificate authority DIR/ca.crt (as podman's --cert-dir).",
)
@click.option(
    "--username",
    metavar="USER",
    help="Log in as USER; the password is read from $GUIX_IMAGE_PASSWORD, else standard "
    "input. Without it: the credentials of podman login or docker login, if any.",
)
@click.option(
    "--digest-file",
    type=click.Path(dir_okay=False),
    help="Write the pushed manifest's digest to FILE (as skopeo's).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, exists=True),
    help="Read store paths under DIR, as for a chroot store (as build's).",
)
@items_options
@JSON_OPTION
@common_options
def push(
    sources: tuple[str, ...],
    ref: str,
    image: str | None,
    platform: str | None,
    compress: str,
    from_repo: str | None,
    insecure: bool,
    tls_verify: bool,
    cert_dir: str | None,
    username: str | None,
    digest_file: str | None,
    as_json: bool,
    root: str | None,
    **items: Any,
) -> None:
    """Push an image to a registry, uploading only the blobs it lacks.

    SOURCE is a build CONFIG, or STORE_ITEMs with build's options (built
    first, trusting the layer cache: layers it keeps compressed are neither
    read nor compressed again), or any archive or layout the readers take
    (docker-archive, oci-archive, oci:DIR[:TAG], docker://...). REF is [docker://]HOST[:PORT]/NAME[:TAG]
    or ...@sha256:DIGEST. Blobs the registry has are skipped; the manifest
    goes last, so a push that fails leaves no tag. Prints REF@sha256:...

    \b
    Examples:
      guix-image push image.json localhost:5000/app:1.0
      guix-image push $(guix build hello) -S /bin=bin localhost:5000/hello:2.12
      guix-image push app.tar registry.example/team/app:1.0 --username me
      guix-image push oci:layout:app:1.0 localhost:5000/app:1.0 --from-repo base
    """
    from ..registry.push import push_image
    from ..registry.reference import parse_reference
    from ..registry.remote import Repository

    if not sources:
        raise click.UsageError("give SOURCE (a CONFIG, STORE_ITEMs or an archive) and REF")
    reference = parse_reference(ref)
    transport = _transport(reference, insecure, tls_verify, cert_dir, username)
    repository = Repository(transport, reference)

    from .units import human_size

    quiet = flag("quiet")  # read here: blobs go up on other threads

    def on_blob(digest: str, size: int, fate: str) -> None:
        if not quiet:  # one line per blob as it is done, as docker push shows them
            click.echo(f"{fate:>8} {digest} ({human_size(size)})", err=True)

    with _image_of(sources, image, platform, compress, root, items, reference) as chosen:
        report = push_image(
            chosen, repository, mount_from=from_repo, memory=_memory(), on_blob=on_blob
        )
    if digest_file is not None:
        from ..build.output import write_atomically

        write_atomically(digest_file, report.digest + "\n")
    note(
        f"Pushed {report.pinned}: {len(report.uploaded)} uploaded, "
        f"{len(report.mounted)} mounted, {len(report.present)} already there "
        f"({transport.requests} requests)"
    )
    out = output()
    if as_json:
        out.json(
            {
                "reference": report.reference,
                "digest": report.digest,
                "uploaded": report.uploaded,
                "mounted": report.mounted,
                "present": report.present,
            }
        )
    else:
        click.echo(report.pinned)


def _memory() -> Any:
    """Where earlier pushes went (beside the layer cache), for mounts."""
    from ..build.cache import default_directory
    from ..registry.push import PushMemory

    return PushMemory(str(default_directory() / "pushed"))


def _transport(
    reference: Any, insecure: bool, tls_verify: bool, cert_dir: str | None, username: str | None
) -> Any:
    from ..registry.credentials import Credentials
    from ..registry.transport import connect

    credentials = None
    if username is not None:
        password = os.environ.get("GUIX_IMAGE_PASSWORD")
        if password is None:
            try:
                if sys.stdin.isatty():
                    import getpass

                    password = getpass.getpass(f"Password for {username}@{reference.host}: ")
                else:
                    password = sys.stdin.readline().rstrip("\n")
            except (EOFError, OSError):
                password = ""
            if not password:
                raise CommandError(
                    f"--username {username}: no password in $GUIX_IMAGE_PASSWORD "
                    "or on standard input",
                    2,
                )
        credentials = Credentials(username, password)
    ca_file = None
    if cert_dir is not None:
        ca_file = os.path.join(cert_dir, "ca.crt")
        if not os.path.isfile(ca_file):
            raise CommandError(f"--cert-dir {cert_dir}: there is no ca.crt in it", 2)
    return connect(
        reference, insecure=insecure, verify=tls_verify, ca_file=ca_file, credentials=credentials
    )


def _read_build_config(source: str) -> Any:
    from ..build.config import parse_config
    from .build import _read_config

    text, name = _read_config(source)
    return parse_config(text, source=name)


@contextlib.contextmanager
def _image_of(
    sources: tuple[str, ...],
    image: str | None,
    platform: str | None,
    compress: str,
    root: str | None,
    items: dict[str, Any],
    reference: Any,
) -> Iterator[Any]:
    """The image to push: read from SOURCE, or built from a CONFIG or STORE_ITEMs."""
    from .build import _customisation_directory, _plan_items, _refuse_items_options, _store_items

    store_items = _store_items(sources, items["store_dir"])
    _refuse_items_options(items, store_items is not None)
    if store_items is None and len(sources) > 1:
        raise click.UsageError(f"{sources[1]!r}: one SOURCE, or store items only")
    if store_items is not None:
        from ..build.config import validate_config

        with _customisation_directory(items) as customisation:
            tag = f"{reference.repository}:{reference.tag or 'latest'}"
            plan = _plan_items(store_items, tag, root, customisation, items)
            config = validate_config(plan.document, source="store items", repo_tag=tag)
            with _built(config, compress, root) as chosen:
                yield chosen
        return
    if _is_config(sources[0]):
        with _built(_read_build_config(sources[0]), compress, root) as chosen:
            yield chosen
        return
    with opened(sources[0], None, image, platform) as (_, chosen):
        yield chosen


@contextlib.contextmanager
def _built(config: Any, compress: str, root: str | None) -> Iterator[Any]:
    """The image `config` gives, built into a temporary layout (its blobs linked
    from the layer cache), trusting the cache: a layer whose compressed blob the
    cache keeps is not read again (the cache key holds each store path's
    identity, its NAR hash or inode and times), so an unchanged image pushes
    with HEAD requests only, and one with a changed store item makes that
    layer alone."""
    import tempfile

    from ..build.cache import LayerCache, default_directory
    from ..build.engine import build_image
    from ..build.oci import OciOutput
    from ..formats.compression import choose

    for warning in config.warnings:
        note(f"warning: {warning}")
    cache = LayerCache(default_directory(), lambda message: note(f"warning: {message}"))
    # Beside the kept blobs, so that the layout links them instead of copying.
    beside = cache.directory.parent
    with contextlib.suppress(OSError):
        beside.mkdir(parents=True, exist_ok=True)
    near = str(beside) if os.access(beside, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=".push-", dir=near) as directory:
        layout = os.path.join(directory, "layout")
        oci = OciOutput(
            "oci-dir", layout, choose(compress), kept_blobs=cache.blobs, trust_cache=True
        )
        build_image(config, oci, cache=cache, root=root)
        with opened(layout, None, None, None) as (_, chosen):
            yield chosen


def _is_config(source: str) -> bool:
    """A build config (JSON), rather than an archive or layout."""
    if not os.path.isfile(source):
        return False
    with open(source, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")
