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
    images: list[Image[StoredLayer]], choice: str | None, where: str, platform: str | None = None
) -> Image[StoredLayer]:
    """The image `choice` names, on `platform` (os/arch[/variant]) if given, or the only one.

    `choice` is a number from 1, a name as docker reads it (`app` is
    `app:latest`; `docker.io/library/` and podman's `localhost/` do not
    matter), a repository (any of its tags), or an image ID or a unique
    prefix of one. Several images matching is an error listing them.
    """
    candidates = images
    if platform is not None:
        candidates = [image for image in images if _on_platform(image, platform)]
        if not candidates:
            raise InputError(
                f"{where} has no image for {platform}; it has " + _listing(images, images)
            )
    if choice is None:
        if len(candidates) == 1:
            return candidates[0]
        raise InputError(
            f"{where} holds {len(candidates)} images; choose one with --image"
            + (" or --platform" if len({platform_of(i) for i in candidates}) > 1 else "")
            + ": "
            + _listing(candidates, images)
        )
    if choice.isascii() and choice.isdigit() and len(choice) < 4:  # a number, not an ID
        number = int(choice)
        if 1 <= number <= len(images) and images[number - 1] in candidates:
            return images[number - 1]
        raise InputError(
            f"{where}: there is no image {number}; choose from " + _listing(candidates, images)
        )
    matched = _matching(candidates, choice)
    if len(matched) == 1:
        return matched[0]
    if not matched:
        raise InputError(
            f"{where}: no image is named {choice!r}; choose from " + _listing(candidates, images)
        )
    raise InputError(
        f"{where}: {choice!r} names {len(matched)} images; choose one of "
        + _listing(matched, images)
    )


def platform_of(image: Image[StoredLayer]) -> str:
    """os/architecture[/variant], from the image's config."""
    parts = [image.config.get(key) for key in ("os", "architecture", "variant")]
    return "/".join(part for part in parts if isinstance(part, str) and part)


def _on_platform(image: Image[StoredLayer], platform: str) -> bool:
    mine = platform_of(image)
    return mine == platform or mine.startswith(platform + "/")


def _matching(images: list[Image[StoredLayer]], choice: str) -> list[Image[StoredLayer]]:
    """By name as docker reads names, else by repository, else by ID or its prefix."""
    wanted = canonical_name(choice)
    by_name = [i for i in images if wanted in {canonical_name(t) for t in i.repo_tags}]
    if by_name:
        return by_name
    repository = _repository(wanted)
    by_repository = [
        i for i in images if repository in {_repository(canonical_name(t)) for t in i.repo_tags}
    ]
    if by_repository and ":" not in choice.rpartition("/")[2]:
        return by_repository
    hex_id = choice.removeprefix("sha256:").lower()
    if len(hex_id) >= 4 and all(c in "0123456789abcdef" for c in hex_id):
        return [i for i in images if i.config_digest.removeprefix("sha256:").startswith(hex_id)]
    return []


def canonical_name(name: str) -> str:
    """A name as docker compares names: with a tag (`latest` if none), without
    the default registry's `docker.io/library/` or podman's `localhost/`."""
    reference, at, digest = name.partition("@")
    repository, tag = _split_tag(reference)
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "localhost/"):
        if repository.startswith(prefix):
            repository = repository[len(prefix) :]
            break
    if at:
        return f"{repository}@{digest}"
    return f"{repository}:{tag or 'latest'}"


def _split_tag(reference: str) -> tuple[str, str]:
    """ "registry:5000/app:1.0" -> ("registry:5000/app", "1.0")."""
    name, colon, tag = reference.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (reference, "")


def _repository(name: str) -> str:
    return _split_tag(name.partition("@")[0])[0]


def _listing(shown: list[Image[StoredLayer]], images: list[Image[StoredLayer]]) -> str:
    return "; ".join(
        f"{images.index(image) + 1} ({', '.join(image.repo_tags) or 'untagged'}, "
        f"{image.config_digest[:19]}, {platform_of(image) or 'no platform'})"
        for image in shown
    )
