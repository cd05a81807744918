"""`guix-image push`: an image, built or read, into a registry."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

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
@click.argument("source", metavar="SOURCE", shell_complete=complete_archive)
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
    help="Mount blobs the registry has in repository NAME instead of uploading them.",
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
@JSON_OPTION
@common_options
def push(
    source: str,
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
) -> None:
    """Push an image to a registry, uploading only the blobs it lacks.

    SOURCE is a build CONFIG (built first, with the layer cache, its layers
    compressed), or any archive or layout the readers take (docker-archive,
    oci-archive, oci:DIR[:TAG], ...). REF is [docker://]HOST[:PORT]/NAME[:TAG]
    or ...@sha256:DIGEST. Blobs the registry has are skipped; the manifest
    goes last, so a push that fails leaves no tag. Prints REF@sha256:...

    \b
    Examples:
      guix-image push image.json localhost:5000/app:1.0
      guix-image push app.tar registry.example/team/app:1.0 --username me
      guix-image push oci:layout:app:1.0 localhost:5000/app:1.0 --from-repo base
    """
    from ..registry.push import push_image
    from ..registry.reference import parse_reference
    from ..registry.remote import Repository

    reference = parse_reference(ref)
    transport = _transport(reference, insecure, tls_verify, cert_dir, username)
    repository = Repository(transport, reference)

    chatty = flag("verbose") and not flag("quiet")  # read here: blobs go up on other threads

    def on_blob(digest: str, fate: str) -> None:
        if chatty:
            click.echo(f"{digest}: {fate}", err=True)

    with _image_of(source, image, platform, compress) as chosen:
        report = push_image(chosen, repository, mount_from=from_repo, on_blob=on_blob)
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
    from ..files import read_regular

    try:
        text = read_regular(source, 64 << 20)
    except OSError as error:
        raise CommandError(f"{source}: {error.strerror or error}", 2) from None
    return parse_config(text, source=source)


@contextlib.contextmanager
def _image_of(source: str, image: str | None, platform: str | None, compress: str) -> Iterator[Any]:
    """The image to push: read from SOURCE, or built from it into a temporary
    layout first (its blobs linked from the layer cache). That build trusts the
    cache: a layer whose compressed blob the cache keeps is not read again (the
    cache key holds each store path's identity, its NAR hash or inode and
    times), so an unchanged image pushes with HEAD requests only, and one with
    a changed store item makes that layer alone."""
    if not _is_config(source):
        with opened(source, None, image, platform) as (_, chosen):
            yield chosen
        return
    import tempfile

    from ..build.cache import LayerCache, default_directory
    from ..build.engine import build_image
    from ..build.oci import OciOutput
    from ..formats.compression import choose

    config = _read_build_config(source)
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
        build_image(config, oci, cache=cache)
        with opened(layout, None, None, None) as (_, chosen):
            yield chosen


def _is_config(source: str) -> bool:
    """A build config (JSON), rather than an archive or layout."""
    if not os.path.isfile(source):
        return False
    with open(source, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")
