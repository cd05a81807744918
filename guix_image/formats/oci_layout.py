"""OCI image layouts (image-spec `image-layout.md`), as a directory or a tar.

`index.json` lists manifests (or nested indexes, for several platforms);
every manifest, config and layer is a blob at `blobs/<alg>/<hex>` whose
content must match its descriptor's digest and size.

Reading: what a descriptor says is recorded as a check, which `verify`
completes with what the bytes say.

Writing: a `BlobStore` writes each blob beside its place and renames it to
its digest, so a blob is whole or absent; `LayoutWriter` writes index.json
last and atomically, so a layout never names a blob it does not hold, and
keeps the images it already held. `write_archive` streams a layout's blobs
as one tar (`oci-archive`), checking each blob's digest as it copies it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import strict_json
from ..errors import ArchiveError, InputError, OperationError
from ..files import read_regular, write_all
from ..model import (
    SHA256_PREFIX,
    Check,
    Image,
    PendingDigest,
    TarSink,
    canonical_json,
    is_sha256_digest,
    sha256_digest,
)
from ..tar.format import DIRTYPE, END_OF_ARCHIVE, REGTYPE, padding
from ..tar.writer import HeaderEncoder
from .compression import ANNOTATION as COMPRESSION_ANNOTATION
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

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = canonical_json({"imageLayoutVersion": "1.0.0"})
MANIFEST_TYPES = {
    OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
TAG_ANNOTATIONS = ("io.containerd.image.name", REF_NAME)


def blob_location(descriptor: dict[str, Any], where: str) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or ":" not in digest:
        raise ArchiveError(f"{where}: descriptor has no digest")
    if not is_sha256_digest(digest):
        raise ArchiveError(f"{where}: unsupported or malformed digest {digest!r}")
    return "blobs/sha256/" + digest.removeprefix(SHA256_PREFIX)


def read_layout(source: Source) -> list[Image[StoredLayer]]:
    """Every image the layout's index.json leads to."""
    kind = {"directory": "oci-layout", "registry": "registry"}.get(source.kind, "oci-archive")
    layout_checks = [] if source.kind == "registry" else _check_layout_file(source)
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
            image.manifest = data
            image.manifest_media_type = media_type if isinstance(media_type, str) else OCI_MANIFEST
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
                compressed_by=_annotation(descriptor, COMPRESSION_ANNOTATION),
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


def _annotation(descriptor: dict[str, Any], key: str) -> str | None:
    annotations = descriptor.get("annotations")
    value = annotations.get(key) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else None


def _declared_size(descriptor: dict[str, Any]) -> int | None:
    size = descriptor.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


# -- writing ---------------------------------------------------------------------

_COPY_CHUNK = 1 << 20
_TEMPORARY_PREFIX = ".new-"


@dataclass(frozen=True)
class Descriptor:
    """What an index or manifest says of a blob it points to."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            document["annotations"] = self.annotations
        if self.platform:
            document["platform"] = self.platform
        return document


def manifest_document(config: Descriptor, layers: list[Descriptor]) -> bytes:
    """An OCI image manifest's bytes."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )


class BlobStore:
    """Blobs at `root`/blobs/sha256/<hex>, each whole or absent."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.directory = os.path.join(root, "blobs", "sha256")

    def create(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create {self.directory}: {error.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise InputError(f"cannot write in {self.directory}")

    def touch(self, digest: str) -> None:
        """Mark the blob as recently used (housekeeping: never fails)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(digest))

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest.removeprefix(SHA256_PREFIX))

    def has(self, digest: str, size: int) -> bool:
        """Whether the blob is there, a regular file of `size` bytes (its bytes are
        checked by whoever copies them)."""
        try:
            st = os.lstat(self.path(digest))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    @contextlib.contextmanager
    def new_blob(self) -> Iterator[tuple[int, str]]:
        """A new temporary file beside the blobs: its descriptor and path, removed
        unless `commit` renamed it."""
        import tempfile

        fd, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=self.directory)
        try:
            yield fd, temporary
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def commit(self, temporary: str, digest: str) -> str:
        """Give the temporary file its name, `digest`; its path."""
        path = self.path(digest)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        return path

    def put(self, data: bytes) -> str:
        """Store `data` (unless it is there); its digest."""
        digest = sha256_digest(data)
        if not self.has(digest, len(data)):
            with self.new_blob() as (fd, temporary):
                write_all(fd, memoryview(data))
                self.commit(temporary, digest)
        return digest

    def adopt(self, path: str, digest: str, size: int) -> None:
        """Make the blob at `path` (another store's, known good) one of these."""
        if self.has(digest, size) or os.path.abspath(path) == os.path.abspath(self.path(digest)):
            return
        with self.new_blob() as (_, temporary):
            os.unlink(temporary)
            try:
                os.link(path, temporary)  # the same file system: no copy
            except OSError:
                with open(path, "rb") as source, open(temporary, "wb") as target:
                    while chunk := source.read(_COPY_CHUNK):
                        target.write(chunk)
            self.commit(temporary, digest)


class LayoutWriter(BlobStore):
    """An OCI layout directory that blobs and then images are added to."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        if os.path.exists(root) and not os.path.isdir(root):
            raise InputError(f"output {root} exists and is not a directory")
        if not is_empty(root) and not _is_layout(root):
            raise InputError(
                f"output {root} is a directory that is not an OCI layout; refusing to write in it"
            )
        parent = os.path.dirname(os.path.abspath(root))
        if not os.path.isdir(parent):
            raise InputError(f"output {root}: directory {parent} does not exist")
        _existing_manifests(os.path.join(root, "index.json"))  # refused now, not at the end
        # oci-layout first: another build into the same new directory sees a layout.
        with contextlib.suppress(FileExistsError):
            os.mkdir(root)
        layout = os.path.join(root, "oci-layout")
        if not os.path.exists(layout):
            replace_file(layout, LAYOUT_FILE)
        self.create()

    def add_image(self, manifest: Descriptor, names: list[str]) -> None:
        """List the image in index.json, under each of `names` (or none), keeping
        the other images, those that had these names excepted.

        Builds into one layout at once take turns (a lock file beside the
        index): neither loses the other's image.
        """
        import fcntl

        path = os.path.join(self.root, "index.json")
        lock = os.open(os.path.join(self.root, ".index.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kept = [
                entry
                for entry in _existing_manifests(path)
                if not _replaced(entry, manifest.digest, names)
            ]
            replace_file(path, index_document(manifest, names, kept))
        finally:
            os.close(lock)


def index_document(
    manifest: Descriptor, names: list[str], kept: list[dict[str, Any]] | None = None
) -> bytes:
    """An index.json listing the images `kept` and `manifest`, once per name."""
    added = [
        Descriptor(manifest.media_type, manifest.digest, manifest.size, {REF_NAME: name})
        for name in names
    ] or [manifest]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [*(kept or []), *(d.to_json() for d in added)],
    }
    return canonical_json(index)


def is_empty(root: str) -> bool:
    """Whether `root` is missing, or a directory of nothing but dot-files (the
    temporary files of another build just starting there)."""
    try:
        return all(name.startswith(".") for name in os.listdir(root))
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return False


def _is_layout(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "oci-layout"))


def _existing_manifests(path: str) -> list[dict[str, Any]]:
    try:
        data = read_regular(path, MAX_MANIFEST_SIZE)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None
    try:
        index = strict_json.loads(data)
    except strict_json.JSONRefused as error:
        raise InputError(error.describe(path)) from None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise InputError(f'{path} has no "manifests" list; refusing to rewrite it')
    return manifests


def _replaced(entry: dict[str, Any], digest: str, names: list[str]) -> bool:
    """Whether an index entry gives way to the new image: it has one of its
    names, or it is the same manifest without a name."""
    annotations = entry.get("annotations")
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name in names if name is not None else entry.get("digest") == digest


def replace_file(path: str, data: bytes) -> None:
    """`path` holds `data`, whole, or what it held before (written beside it,
    synced, renamed into place)."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class BlobMismatch(OperationError):
    """A blob's bytes are not those its name says."""

    def __init__(self, path: str, digest: str) -> None:
        super().__init__(f"blob {path} is not the blob {digest} it should be")
        self.path = path


@dataclass(frozen=True)
class ArchivedBlob:
    """A blob to put in an archive: its digest and size, the file it is in, and
    whether its bytes must be checked on the way (not if they were just made)."""

    digest: str
    size: int
    path: str
    check: bool = True


def write_archive(
    out: TarSink,
    documents: list[tuple[str, bytes]],
    blobs: list[ArchivedBlob],
    *,
    mtime: int,
) -> list[tuple[ArchivedBlob, PendingDigest]]:
    """Stream an OCI layout as one tar to `out`: `documents` (name, bytes) first,
    then `blobs`. Each blob to check is hashed on the way: once `out` drains,
    `check_blobs` says whether each is what its name says."""
    encoder = HeaderEncoder(mtime=mtime)
    for directory in (b"blobs/", b"blobs/sha256/"):
        out.write(encoder.encode(directory, DIRTYPE, 0o755))
    for name, data in documents:
        out.write(encoder.encode(name.encode(), REGTYPE, 0o644, len(data)))
        out.write(data)
        out.write_zeros(padding(len(data)))
    checked = []
    for blob in blobs:
        name = "blobs/sha256/" + blob.digest.removeprefix(SHA256_PREFIX)
        out.write(encoder.encode(name.encode(), REGTYPE, 0o644, blob.size))
        try:
            fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise OperationError(f"cannot read blob {blob.path}: {error.strerror}") from None
        try:
            if blob.check:
                checked.append((blob, out.begin_digest()))
            out.copy_from_fd(fd, blob.size, blob.path)
            if blob.check:
                out.end_digest()
        finally:
            os.close(fd)
        out.write_zeros(padding(blob.size))
    out.write(END_OF_ARCHIVE)
    return checked


def check_blobs(checked: list[tuple[ArchivedBlob, PendingDigest]]) -> None:
    """BlobMismatch for the first blob write_archive copied that is not what its
    name says (once the stream it was written to has drained)."""
    for blob, digest in checked:
        if digest.result().digest != blob.digest:
            raise BlobMismatch(blob.path, blob.digest)
