"""`verify`: check an archive's digests against its bytes, and a rebuild against it.

The checks are at least what `crane validate` checks: every layer's
uncompressed sha256 equals its diff_id; an OCI blob's digest and size equal
its descriptor's; the config's digest equals its name or descriptor; as many
layers as diff_ids; no duplicate paths in a layer; no truncated member. Each
is reported with what was expected and what was found.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .archive import Source, StreamSource, read_images
from .diffing import FILE_FIELDS, compare_files
from .image import ImageRecord, LayerRef
from .inspection import TooMuchWork, read_layers
from .layer_contents import DIGESTS, EVERYTHING, LayerContents, ReadOptions
from .tarreader import ArchiveError


@dataclass
class Check:
    name: str
    ok: bool
    expected: str
    actual: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "expected": self.expected, "actual": self.actual}


def check_archive(
    source: Source, image: ImageRecord, on_layer: Callable[[LayerRef], None] | None = None
) -> tuple[list[Check], list[LayerContents | None]]:
    """Every check of the image's own consistency, and the layers as read."""
    checks = [Check(e.name, e.ok, e.expected, e.actual) for e in image.expectations]
    contents = _read_each(source, image, DIGESTS, on_layer)
    for ref, layer in zip(image.layers, contents, strict=True):
        prefix = f"layer {ref.index}"
        if isinstance(layer, ArchiveError):
            checks.append(Check(f"{prefix} readable", False, "a complete tar", str(layer)))
            continue
        checks.append(
            Check(
                f"{prefix} diff_id",
                layer.diff_id == ref.diff_id,
                str(ref.diff_id),
                str(layer.diff_id),
            )
        )
        if ref.digest is not None:
            checks.append(
                Check(
                    f"{prefix} blob digest",
                    layer.blob_digest == ref.digest,
                    ref.digest,
                    str(layer.blob_digest),
                )
            )
        checks.append(
            Check(
                f"{prefix} duplicate paths",
                not layer.duplicates,
                "none",
                ", ".join(layer.duplicates) or "none",
            )
        )
        checks.append(
            Check(
                f"{prefix} paths inside the image",
                not layer.unsafe,
                "all",
                ", ".join(layer.unsafe) or "all",
            )
        )
    return checks, [c if isinstance(c, LayerContents) else None for c in contents]


def _read_each(
    source: Source,
    image: ImageRecord,
    options: ReadOptions,
    on_layer: Callable[[LayerRef], None] | None,
) -> list[LayerContents | ArchiveError]:
    """Each layer read, or the error that stopped it: a bad layer is a failed check."""
    try:
        return list(read_layers(source, image, options, on_layer=on_layer))
    except TooMuchWork:
        raise
    except ArchiveError:
        pass  # find which ones fail, one by one
    by_location: dict[str, LayerContents | ArchiveError] = {}
    for ref in image.layers:
        if ref.location not in by_location:
            try:
                by_location[ref.location] = source.read_layer(ref, options)
            except ArchiveError as error:
                by_location[ref.location] = error
    return [by_location[ref.location] for ref in image.layers]


def compare_layers(
    name: str, image: ImageRecord, other_ids: list[str | None], other_config_digest: str | None
) -> tuple[list[Check], int | None]:
    """Layer-by-layer digest checks against another build; the first differing layer."""
    checks = []
    first_mismatch = None
    ours = [ref.diff_id for ref in image.layers]
    checks.append(
        Check(
            f"{name} layer count", len(ours) == len(other_ids), str(len(ours)), str(len(other_ids))
        )
    )
    for index in range(max(len(ours), len(other_ids))):
        expected = ours[index] if index < len(ours) else None
        actual = other_ids[index] if index < len(other_ids) else None
        ok = expected == actual
        if not ok and first_mismatch is None:
            first_mismatch = index + 1
        checks.append(Check(f"{name} layer {index + 1}", ok, str(expected), str(actual)))
    if other_config_digest is not None:
        checks.append(
            Check(
                f"{name} config digest",
                image.config_digest == other_config_digest,
                image.config_digest,
                other_config_digest,
            )
        )
    return checks, first_mismatch


def compare_images(
    name: str, source: Source, image: ImageRecord, other_source: Source, other: ImageRecord
) -> tuple[list[Check], dict[str, Any] | None]:
    """Digest checks of `image` against `other`, and the files of the first layer that differs."""
    other_ids = [ref.diff_id for ref in other.layers]
    checks, first = compare_layers(name, image, other_ids, other.config_digest)
    if first is None or first > min(len(image.layers), len(other.layers)):
        return checks, None
    ours = source.read_layer(image.layers[first - 1], EVERYTHING)
    theirs = other_source.read_layer(other.layers[first - 1], EVERYTHING)
    files = compare_files(ours.files or [], theirs.files or [], FILE_FIELDS)
    return checks, {"layer": first, "files": files}


def read_rebuild(build: Any) -> tuple[ImageRecord, StreamSource]:
    """Run `build(sink_fd)` in a thread and read the archive it streams, in one pass."""
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            build(write_end)
        except BaseException as error:  # reported after the reader is done
            failure.append(error)
        finally:
            os.close(write_end)

    thread = threading.Thread(target=produce, name="guix-image-rebuild", daemon=True)
    thread.start()
    stream: BinaryIO
    with open(read_end, "rb") as stream:
        try:
            source = StreamSource(stream, "<rebuild>", EVERYTHING)
        except ArchiveError:
            source = None  # the build failed half-way: its error says why
        finally:
            while stream.read(1 << 20):
                pass  # let the build finish even if reading stopped
    thread.join()
    if failure:
        raise failure[0]
    assert source is not None
    images = read_images(source)
    return images[0], source
