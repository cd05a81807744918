"""Docker image archives (`docker save` / `docker load`, Image Specification v1.2).

Writing: layers are streamed as `NNN/layer.tar` members, then the config as
`<sha256>.json`, then `manifest.json`, so the archive can be produced in one
pass and read back in one pass.
"""

from __future__ import annotations

from .errors import OperationError
from .hashing_writer import Digest, HashingWriter
from .image import canonical_json, sha256_hex
from .layers import Layer, ProgressCallback
from .tarwriter import END_OF_ARCHIVE, REGTYPE, HeaderEncoder, padding

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
        digest = self._writer.begin_digest()
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
