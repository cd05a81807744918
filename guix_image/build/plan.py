"""What to build: every layer of the image, checked before a byte is written.

What can be checked cheaply is checked here: that store paths exist, the
base image's structure and that its blobs can be read, the customisation
layer's checksum. A `Plan` lists the layers in order: the base image's
first (as its reader gives them), then one per store layer of the config,
then the customisation layer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..errors import InputError
from ..files import open_regular, read_regular
from ..formats.stored_layer import StoredLayer, TarFileLayer
from ..model import SHA256_PREFIX, Image, Layer, is_sha256_digest
from ..store.walk import Store
from ..tar.writer import HeaderEncoder
from .config import BuildConfig
from .store_layer import MAX_PLANNED, StoreLayer


@dataclass
class Plan:
    layers: list[Layer]
    # The layers made of store paths, by their position in `layers`: those the
    # cache knows, and that can be scanned ahead.
    store_layers: dict[int, StoreLayer]
    base: Image[StoredLayer] | None


def plan_layers(
    config: BuildConfig, *, root: str | None = None, max_planned: int = MAX_PLANNED
) -> Plan:
    """Check the inputs and describe every layer, base image layers first.

    `max_planned`: members of a layer scanned ahead and kept (see StoreLayer).
    """
    store = Store(config.store_dir, root)
    base = base_image(config.from_image)
    layers: list[Layer] = list(base.layers) if base is not None else []
    encoder = HeaderEncoder(
        mtime=config.mtime, uid=config.uid, gid=config.gid, uname=config.uname, gname=config.gname
    )
    store_layers: dict[int, StoreLayer] = {}
    for i, paths in enumerate(config.store_layers):
        where = f"config field 'store_layers'[{i}]"
        for j, path in enumerate(paths):
            store.check_path(path, f"{where}[{j}]")
        store_layers[len(layers)] = layer = StoreLayer(
            store, paths, encoder, where, max_planned=max_planned
        )
        layers.append(layer)
    if config.customisation_layer is not None:
        layers.append(_customisation_layer(config.customisation_layer))
    return Plan(layers, store_layers, base)


def base_image(path: str | None) -> Image[StoredLayer] | None:
    """The base image, from an archive or layout of any form, its blobs readable."""
    if path is None:
        return None
    from ..formats.images import read_images
    from ..formats.layer_tar import HEADERS
    from ..formats.sources import open_source

    where = "config field 'from_image'"
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise InputError(f"{where}: {path} is neither a file nor an OCI layout directory")
    try:
        with open_source(path, HEADERS) as source:
            if source.kind == "stream":  # its layers are copied from their blobs later
                raise InputError(
                    f"{path} is read once as a stream (compressed, or a pipe); a base image "
                    "must be an archive file or a layout: decompress it first"
                )
            images = read_images(source)
            if len(images) != 1:
                raise InputError(f"{path} holds {len(images)} images; a base image must be one")
            image = images[0]
            for check in image.checks:
                if check.name == "layer count" and not check.ok:
                    raise InputError(
                        f"{path}: the config has {check.expected} diff_ids "
                        f"but the manifest {check.actual} layers"
                    )
            for layer in image.layers:
                layer.description = f"from base image {path} ({layer.location})"
                layer.compression()  # its blob can be read
            return image
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


def _customisation_layer(directory: str) -> TarFileLayer:
    """The prebuilt layer: `layer.tar` and its `checksum`, checked before use."""
    where = f"config field 'customisation_layer': {directory}"
    checksum_path = os.path.join(directory, "checksum")
    layer_path = os.path.join(directory, "layer.tar")
    try:
        checksum = read_regular(checksum_path, 4096).decode("ascii", "replace").strip()
    except OSError as error:
        raise InputError(f"{where}: cannot read checksum: {error.strerror}") from None
    if not is_sha256_digest(SHA256_PREFIX + checksum):
        raise InputError(f"{where}: checksum file does not hold a sha256 hex digest")
    # Check the layer before writing anything, so that a wrong checksum is bad
    # input (exit 2, nothing written) rather than a broken archive. It is
    # checked again while streaming, in case it changes in between.
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(open_regular(layer_path), "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as error:
        raise InputError(f"{where}: cannot read layer.tar: {error.strerror}") from None
    if digest.hexdigest() != checksum:
        raise InputError(
            f"{where}: layer.tar has sha256 {digest.hexdigest()}, "
            f"but its checksum file says {checksum}"
        )
    return TarFileLayer(
        layer_path,
        size,
        description="with customisation...",
        comment="customisation layer",
        diff_id=SHA256_PREFIX + checksum,
    )
