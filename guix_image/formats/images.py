"""Which images an archive holds, whatever its form, and the one a user names."""

from __future__ import annotations

from ..errors import ArchiveError, InputError
from ..model import Image
from . import docker_archive, oci_layout
from .sources import Source
from .stored_layer import StoredLayer


def read_images(source: Source) -> list[Image[StoredLayer]]:
    """Every image the archive describes."""
    if source.exists("index.json"):
        images = oci_layout.read_layout(source)
        if source.exists("manifest.json"):  # `docker save` since Docker 25 writes both
            docker_archive.add_repo_tags(source, images)
    elif source.exists("manifest.json"):
        images = docker_archive.read_manifest(source)
    else:
        kind = "directory" if source.kind == "directory" else "archive"
        raise ArchiveError(
            f"{source.name}: not an image {kind}: it has no manifest.json or index.json"
        )
    if source.compression != "none":
        for image in images:
            image.format += f", {source.compression}-compressed"
    return images


def select_image(
    images: list[Image[StoredLayer]], choice: str | None, where: str
) -> Image[StoredLayer]:
    """The image `choice` names (a tag, or a number from 1), or the only one."""
    if choice is None:
        if len(images) == 1:
            return images[0]
        raise InputError(
            f"{where} holds {len(images)} images; choose one with --image: " + _listing(images)
        )
    if choice.isascii() and choice.isdigit():
        number = int(choice)
        if 1 <= number <= len(images):
            return images[number - 1]
        raise InputError(f"{where}: there is no image {number}; choose from " + _listing(images))
    for image in images:
        if choice in image.repo_tags or any(_repository(t) == choice for t in image.repo_tags):
            return image
    raise InputError(f"{where}: no image is tagged {choice!r}; choose from " + _listing(images))


def _repository(tag: str) -> str:
    """The name without its tag: "registry:5000/app:1.0" -> "registry:5000/app"."""
    name, colon, version = tag.rpartition(":")
    return name if colon and "/" not in version else tag


def _listing(images: list[Image[StoredLayer]]) -> str:
    return "; ".join(
        f"{i} ({', '.join(image.repo_tags) or 'untagged'}, {image.config_digest[:19]})"
        for i, image in enumerate(images, 1)
    )
