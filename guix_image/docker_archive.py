"""Docker image archives (`docker save` / `docker load`, Image Specification v1.2).

Writing: layers are streamed as `NNN/layer.tar` members, then the config as
`<sha256>.json`, then `manifest.json`, so the archive can be produced in one
pass and read back in one pass. Reading: the images manifest.json lists,
from any source (see archive.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import OperationError
from .image import Expectation, ImageRecord, LayerRef, canonical_json, sha256_hex
from .tarwriter import END_OF_ARCHIVE, REGTYPE, HeaderEncoder, padding

if TYPE_CHECKING:  # the readers of archives need none of the build's machinery
    from .archive import ConfigReader, Source
    from .hashing_writer import Digest, HashingWriter
    from .layers import Layer, ProgressCallback

MEMBER_MODE = 0o644


def layer_member_name(index: int) -> str:
    return f"{index:03d}/layer.tar"


class DockerArchiveWriter:
    """Writes a Docker v1.2 archive to a HashingWriter, layer by layer."""

    def __init__(self, writer: HashingWriter, *, mtime: int) -> None:
        self._writer = writer
        self._encoder = HeaderEncoder(mtime=mtime)
        self.layer_names: list[str] = []

    def add_layer(self, layer: Layer, size: int, progress: ProgressCallback) -> Digest:
        """Stream one layer tar of `size` bytes; its digest is final after `drain`."""
        name = layer_member_name(len(self.layer_names) + 1)
        self._writer.write(self._encoder.encode(name.encode(), REGTYPE, MEMBER_MODE, size))
        start = self._writer.position
        digest = self._writer.begin_digest(layer.expected_checkpoints)
        layer.write_to(self._writer, progress)
        self._writer.end_digest()
        written = self._writer.position - start
        if written != size:
            raise OperationError(f"layer {name}: wrote {written} bytes where {size} were planned")
        self._writer.write_zeros(padding(size))
        self.layer_names.append(name)
        return digest

    def finish(self, config: bytes, repo_tags: list[str]) -> str:
        """Write the config and manifest.json and end the archive; returns the image id."""
        image_id = sha256_hex(config)
        config_name = f"{image_id}.json"
        self._add_file(config_name, config)
        manifest = [{"Config": config_name, "RepoTags": repo_tags, "Layers": self.layer_names}]
        self._add_file("manifest.json", canonical_json(manifest))
        self._writer.write(END_OF_ARCHIVE)
        return image_id

    def _add_file(self, name: str, data: bytes) -> None:
        self._writer.write(self._encoder.encode(name.encode(), REGTYPE, MEMBER_MODE, len(data)))
        self._writer.write(data)
        self._writer.write_zeros(padding(len(data)))


# -- reading -----------------------------------------------------------------


def read_manifest(source: Source) -> list[ImageRecord]:
    """Every image listed in the archive's manifest.json."""
    from .archive import MAX_MANIFEST_SIZE, MAX_MANIFESTS, ConfigReader
    from .tarreader import ArchiveError

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


def add_repo_tags(source: Source, images: list[ImageRecord]) -> None:
    """Docker 25+ archives are OCI layouts with a manifest.json: take its tags."""
    from .archive import MAX_MANIFEST_SIZE, digest_in_name
    from .tarreader import ArchiveError

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


def _image(source: Source, configs: ConfigReader, entry: Any, position: int) -> ImageRecord:
    from .archive import MAX_LAYERS, digest_in_name
    from .tarreader import ArchiveError

    where = f"{source.name}: manifest.json[{position}]"
    if not isinstance(entry, dict):
        raise ArchiveError(f"{where} is not an object")
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
    diff_ids = config["rootfs"]["diff_ids"]
    image = ImageRecord(
        format="docker-archive",
        repo_tags=list(repo_tags),
        config_location=config_name,
        config_bytes=config_bytes,
        config=config,
        config_digest=config_digest,
        layers=[
            LayerRef(
                index=number,
                location=name,
                size=source.size_of(name),
                diff_id=diff_ids[number - 1] if number <= len(diff_ids) else None,
            )
            for number, name in enumerate(layer_names, 1)
        ],
    )
    claimed = digest_in_name(config_name)
    if claimed is not None:
        image.expectations.append(Expectation("config digest", claimed, image.config_digest))
    image.expectations.append(Expectation("layer count", str(len(diff_ids)), str(len(layer_names))))
    return image
