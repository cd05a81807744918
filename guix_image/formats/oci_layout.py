"""OCI image layouts (image-spec `image-layout.md`), as a directory or a tar.

`index.json` lists manifests (or nested indexes, for several platforms);
every manifest, config and layer is a blob at `blobs/<alg>/<hex>` whose
content must match its descriptor's digest and size. What a descriptor says
is recorded as a check, which `verify` completes with what the bytes say.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArchiveError
from ..model import SHA256_PREFIX, Check, Image, is_sha256_digest, sha256_digest
from .documents import DESCRIPTOR_KEYS, OCI_MANIFEST_KEYS, check_key_case, parse_json
from .limits import (
    MANIFESTS_KEPT_BYTES,
    MAX_INDEX_DEPTH,
    MAX_LAYERS,
    MAX_MANIFEST_SIZE,
    MAX_MANIFESTS,
)
from .sources import ConfigReader, Source
from .stored_layer import StoredLayer

MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
TAG_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")


def blob_location(descriptor: dict[str, Any], where: str) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or ":" not in digest:
        raise ArchiveError(f"{where}: descriptor has no digest")
    if not is_sha256_digest(digest):
        raise ArchiveError(f"{where}: unsupported or malformed digest {digest!r}")
    return "blobs/sha256/" + digest.removeprefix(SHA256_PREFIX)


def read_layout(source: Source) -> list[Image[StoredLayer]]:
    """Every image the layout's index.json leads to."""
    kind = "oci-layout" if source.kind == "directory" else "oci-archive"
    layout_checks = _check_layout_file(source)
    index = source.read_json("index.json", MAX_MANIFEST_SIZE, "index.json")
    walk = _Walk(source, kind, ConfigReader(source))
    walk.index(index, "index.json", [], depth=0)
    images = walk.images
    if not images:
        raise ArchiveError(f"{source.name}: index.json lists no image manifests")
    for image in images:
        image.checks[:0] = layout_checks
    return images


def _check_layout_file(source: Source) -> list[Check]:
    if not source.exists("oci-layout"):
        return [Check.equal("oci-layout file", "present", "missing")]
    layout = source.read_json("oci-layout", MAX_MANIFEST_SIZE, "oci-layout")
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    return [Check.equal("oci-layout version", "1.0.0", str(version))]


class _Walk:
    """A walk through index.json and the indexes it leads to, bounded."""

    def __init__(self, source: Source, kind: str, configs: ConfigReader) -> None:
        self.source, self.kind, self.configs = source, kind, configs
        self.images: list[Image[StoredLayer]] = []
        self._by_manifest: dict[str, Image[StoredLayer]] = {}
        self.walked = 0
        # location -> bytes, digest and document: a manifest listed many times is
        # read once, as long as those kept stay within MANIFESTS_KEPT_BYTES
        self._manifests: dict[str, tuple[bytes, str, dict[str, Any]]] = {}
        self._kept_bytes = 0

    def index(self, index: Any, where: str, tags: list[str], depth: int) -> None:
        source = self.source
        if depth > MAX_INDEX_DEPTH:
            raise ArchiveError(f"{source.name}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise ArchiveError(f'{source.name}: {where} has no "manifests" list')
        check_key_case(index, OCI_MANIFEST_KEYS, f"{source.name}: {where}")
        for position, descriptor in enumerate(index["manifests"]):
            self.walked += 1
            if self.walked > MAX_MANIFESTS:
                raise ArchiveError(f"{source.name}: more than {MAX_MANIFESTS} manifests; refusing")
            here = f"{where} manifests[{position}]"
            if not isinstance(descriptor, dict):
                raise ArchiveError(f"{source.name}: {here} is not a descriptor object")
            check_key_case(descriptor, DESCRIPTOR_KEYS, f"{source.name}: {here}")
            location = blob_location(descriptor, f"{source.name}: {here}")
            data, digest, document = self._manifest(location)
            checks = _descriptor_checks(f"manifest {location}", descriptor, data, digest)
            names = tags + _tags(descriptor)
            media_type = descriptor.get("mediaType") or document.get("mediaType")
            if media_type in INDEX_TYPES or "manifests" in document:
                self.index(document, location, names, depth + 1)
                continue
            same = self._by_manifest.get(location)
            if same is not None:
                # One manifest listed again (Docker 25+ `docker save` lists it once
                # per tag): one image with more names, as `docker load` loads it.
                same.repo_tags = list(dict.fromkeys([*same.repo_tags, *names]))
                same.checks[:0] = [check for check in checks if not check.ok]
                continue
            image = _image(source, self.configs, document, location, self.kind, names)
            image.checks[:0] = checks
            self.images.append(image)
            self._by_manifest[location] = image

    def _manifest(self, location: str) -> tuple[bytes, str, dict[str, Any]]:
        if location in self._manifests:
            return self._manifests[location]
        data = self.source.read_bytes(location, MAX_MANIFEST_SIZE, "manifest")
        where = f"{self.source.name}: manifest {location}"
        manifest = data, sha256_digest(data), parse_json(data, where, want_object=True)
        if self._kept_bytes + len(data) <= MANIFESTS_KEPT_BYTES:
            self._manifests[location] = manifest
            self._kept_bytes += len(data)
        return manifest


def _image(
    source: Source,
    configs: ConfigReader,
    manifest: dict[str, Any],
    location: str,
    kind: str,
    tags: list[str],
) -> Image[StoredLayer]:
    where = f"{source.name}: manifest {location}"
    check_key_case(manifest, OCI_MANIFEST_KEYS, where)
    config_descriptor = manifest.get("config")
    layer_descriptors = manifest.get("layers")
    if not isinstance(config_descriptor, dict):
        raise ArchiveError(f"{where} has no config descriptor")
    if not isinstance(layer_descriptors, list) or not all(
        isinstance(d, dict) for d in layer_descriptors
    ):
        raise ArchiveError(f"{where} has no list of layer descriptors")
    if len(layer_descriptors) > MAX_LAYERS:
        raise ArchiveError(f"{where} lists {len(layer_descriptors)} layers, over {MAX_LAYERS}")
    config_location = blob_location(config_descriptor, where)
    config_bytes, config, config_digest = configs.read(config_location)
    image: Image[StoredLayer] = Image(
        format=kind,
        repo_tags=list(dict.fromkeys(tags)),
        config_location=config_location,
        config_bytes=config_bytes,
        config=config,
        layers=[],
        checks=_descriptor_checks("config", config_descriptor, config_bytes, config_digest),
        config_digest=config_digest,
    )
    diff_ids = image.diff_ids
    check_key_case(config_descriptor, DESCRIPTOR_KEYS, f"{where} config")
    for number, descriptor in enumerate(layer_descriptors, 1):
        check_key_case(descriptor, DESCRIPTOR_KEYS, f"{where} layers[{number - 1}]")
        layer_location = blob_location(descriptor, f"{where} layers[{number - 1}]")
        size = source.size_of(layer_location)
        image.layers.append(
            StoredLayer(
                source,
                number,
                layer_location,
                size,
                diff_id=diff_ids[number - 1] if number <= len(diff_ids) else None,
                digest=descriptor["digest"],
                media_type=descriptor.get("mediaType"),
                declared_size=_declared_size(descriptor),
            )
        )
        image.checks.append(
            Check.equal(f"layer {number} blob size", str(descriptor.get("size")), str(size))
        )
    image.checks.append(Check.equal("layer count", str(len(diff_ids)), str(len(layer_descriptors))))
    return image


def _descriptor_checks(
    what: str, descriptor: dict[str, Any], data: bytes, digest: str | None = None
) -> list[Check]:
    """`digest`: that of `data`, when already known (a config many images share)."""
    actual = digest or sha256_digest(data)
    return [
        Check.equal(f"{what} digest", str(descriptor.get("digest")), actual),
        Check.equal(f"{what} size", str(descriptor.get("size")), str(len(data))),
    ]


def _tags(descriptor: dict[str, Any]) -> list[str]:
    annotations = descriptor.get("annotations")
    if not isinstance(annotations, dict):
        return []
    return [annotations[key] for key in TAG_ANNOTATIONS if isinstance(annotations.get(key), str)][
        :1
    ]


def _declared_size(descriptor: dict[str, Any]) -> int | None:
    size = descriptor.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None
