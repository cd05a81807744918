"""Docker image archives (`docker save` / `docker load`, Image Specification v1.2).

Writing: layers are streamed as `NNN/layer.tar` members, then the config as
`<sha256>.json`, then `manifest.json`, so the archive can be produced in one
pass and read back in one pass. Reading: the images manifest.json lists,
from any source (see sources.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import ArchiveError, OperationError
from ..model import (
    SHA256_PREFIX,
    Check,
    Image,
    Layer,
    PendingDigest,
    Progress,
    TarSink,
    canonical_json,
    sha256_digest,
)
from ..tar.format import END_OF_ARCHIVE, REGTYPE, padding
from ..tar.writer import HeaderEncoder
from .documents import DOCKER_MANIFEST_KEYS, check_key_case, digest_in_name
from .limits import MAX_LAYERS, MAX_MANIFEST_SIZE, MAX_MANIFESTS
from .sources import ConfigReader, Source
from .stored_layer import StoredLayer

MEMBER_MODE = 0o644
DOCKER_MANIFEST = "manifest.json"


def layer_member_name(index: int) -> str:
    return f"{index:03d}/layer.tar"


class DockerArchiveWriter:
    """Writes a Docker v1.2 archive to `out`, layer by layer."""

    def __init__(self, out: TarSink, *, mtime: int) -> None:
        self._out = out
        self._encoder = HeaderEncoder(mtime=mtime)
        self.layer_names: list[str] = []

    def add_layer(self, layer: Layer, progress: Progress) -> PendingDigest:
        """Stream one layer's tar; its digest is final once `out` drains."""
        name = layer_member_name(len(self.layer_names) + 1)
        size = layer.tar_size()
        self._out.write(self._encoder.encode(name.encode(), REGTYPE, MEMBER_MODE, size))
        start = self._out.position
        digest = layer.stream(self._out, progress)
        written = self._out.position - start
        if written != size:
            raise OperationError(f"layer {name}: wrote {written} bytes where {size} were planned")
        self._out.write_zeros(padding(size))
        self.layer_names.append(name)
        return digest

    def finish(self, config: bytes, repo_tags: list[str]) -> str:
        """Write the config and manifest.json and end the archive; the image id."""
        image_id = sha256_digest(config)
        config_name = f"{image_id.removeprefix(SHA256_PREFIX)}.json"
        self._add_file(config_name, config)
        manifest = [{"Config": config_name, "RepoTags": repo_tags, "Layers": self.layer_names}]
        self._add_file("manifest.json", canonical_json(manifest))
        self._out.write(END_OF_ARCHIVE)
        return image_id

    def _add_file(self, name: str, data: bytes) -> None:
        self._out.write(self._encoder.encode(name.encode(), REGTYPE, MEMBER_MODE, len(data)))
        self._out.write(data)
        self._out.write_zeros(padding(len(data)))


# -- reading -----------------------------------------------------------------


def read_manifest(source: Source) -> list[Image[StoredLayer]]:
    """Every image listed in the archive's manifest.json."""
    manifest = source.read_json("manifest.json", MAX_MANIFEST_SIZE, "manifest.json")
    if not isinstance(manifest, list):
        kind = "null" if manifest is None else type(manifest).__name__
        raise ArchiveError(f"{source.name}: manifest.json must be a list of images, not {kind}")
    if not manifest:
        raise ArchiveError(f"{source.name}: manifest.json lists no images")
    if len(manifest) > MAX_MANIFESTS:
        raise ArchiveError(f"{source.name}: manifest.json lists over {MAX_MANIFESTS} images")
    configs = ConfigReader(source)
    return [_image(source, configs, entry, i) for i, entry in enumerate(manifest)]


def add_repo_tags(source: Source, images: list[Image[StoredLayer]]) -> None:
    """Docker 25+ archives are OCI layouts with a manifest.json: take its tags."""
    try:
        manifest = source.read_json("manifest.json", MAX_MANIFEST_SIZE, "manifest.json")
    except ArchiveError:
        return
    if not isinstance(manifest, list):
        return
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            continue
        digest = digest_in_name(entry["Config"])
        tags = entry.get("RepoTags") or []
        for image in images:
            if image.config_digest == digest and isinstance(tags, list):
                image.repo_tags = list(dict.fromkeys([*image.repo_tags, *map(str, tags)]))
                image.format = "docker-archive (Docker 25+ OCI layout)"


def _image(source: Source, configs: ConfigReader, entry: Any, position: int) -> Image[StoredLayer]:
    where = f"{source.name}: manifest.json[{position}]"
    if not isinstance(entry, dict):
        raise ArchiveError(f"{where} is not an object")
    check_key_case(entry, DOCKER_MANIFEST_KEYS, where)
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    repo_tags = entry.get("RepoTags") or []
    if not isinstance(config_name, str) or not config_name:
        raise ArchiveError(f'{where} has no "Config" member name')
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise ArchiveError(f"{where}.Layers is not a list of member names")
    if len(layer_names) > MAX_LAYERS:
        raise ArchiveError(f"{where} lists {len(layer_names)} layers, over {MAX_LAYERS}; refusing")
    if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
        raise ArchiveError(f"{where}.RepoTags is not a list of strings")
    config_bytes, config, config_digest = configs.read(config_name)
    image: Image[StoredLayer] = Image(
        format="docker-archive",
        repo_tags=list(repo_tags),
        config_location=config_name,
        config_bytes=config_bytes,
        config=config,
        config_digest=config_digest,
        layers=[],
    )
    diff_ids = image.diff_ids
    for number, name in enumerate(layer_names, 1):
        diff_id = diff_ids[number - 1] if number <= len(diff_ids) else None
        image.layers.append(
            StoredLayer(source, number, name, source.size_of(name), diff_id=diff_id)
        )
    claimed = digest_in_name(config_name)
    if claimed is not None:
        image.checks.append(Check.equal("config digest", claimed, image.config_digest))
    image.checks.append(Check.equal("layer count", str(len(diff_ids)), str(len(layer_names))))
    return image
