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
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from ..errors import ArchiveError
from ..formats.images import read_images
from ..formats.layer_tar import DIGESTS, EVERYTHING, LayerContents, ReadOptions
from ..formats.sources import Source, StreamSource
from ..formats.stored_layer import StoredLayer
from ..model import Check, Image
from .diff import FILE_FIELDS, FileChange, compare_files
from .overlay import tally
from .read import OnLayer, TooMuchWork, read_layers


@dataclass
class Mismatch:
    """The first layer that differs from the other build, and how its files differ."""

    layer: int  # from 1
    files: list[FileChange]

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "files": [change.to_json() for change in self.files]}


@dataclass
class Verdict:
    """What `verify --json` prints (see README.md)."""

    checks: list[Check]
    mismatch: Mismatch | None = None

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failed(self) -> int:
        return sum(not check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "ok": self.ok,
            "checks": [check.to_json() for check in self.checks],
        }
        if self.mismatch is not None:
            document["mismatch"] = self.mismatch.to_json()
        return document


def read_options(comparing: bool) -> ReadOptions:
    """What to read of every layer: digests, and every file too when comparing."""
    return EVERYTHING if comparing else DIGESTS


def check_archive(
    source: Source, image: Image[StoredLayer], on_layer: OnLayer | None = None
) -> Verdict:
    """Every check of the image's own consistency."""
    checks = list(image.checks)
    contents = _read_each(source, image, DIGESTS, on_layer)
    for layer, read in zip(image.layers, contents, strict=True):
        prefix = f"layer {layer.index}"
        if isinstance(read, ArchiveError):
            checks.append(Check(f"{prefix} readable", False, "a complete tar", str(read)))
            continue
        # What the archive says of the layer must be what its bytes are.
        compression = layer.compression_claim(read)
        for claim in [*layer.digest_claims(read), *([compression] if compression else [])]:
            name = f"{prefix} {claim.what}"
            checks.append(Check(name, claim.holds, str(claim.claimed), str(claim.found)))
        checks.append(
            Check(
                f"{prefix} duplicate paths",
                not read.duplicates,
                "none",
                ", ".join(read.duplicates) or "none",
            )
        )
        checks.append(
            Check(
                f"{prefix} paths inside the image",
                not read.unsafe,
                "all",
                ", ".join(read.unsafe) or "all",
            )
        )
        if read.hard_links:  # a line only where there are any
            checks.append(
                Check(
                    f"{prefix} hard links to earlier entries",
                    not read.unlinkable,
                    "all",
                    ", ".join(read.unlinkable) or "all",
                )
            )
    checks.extend(_loaders_agree(contents))
    return Verdict(checks)


def _loaders_agree(contents: list[LayerContents | ArchiveError]) -> list[Check]:
    """Whether overlayfs (docker's overlay2, containerd, podman) and extraction in
    place (the vfs driver) make one filesystem of the layers: they do not where a
    whiteout covers what its own layer put before it, or a layer puts entries
    below a lower layer's file. A loader would contradict any verdict on what such
    an image holds. A line where the layers have whiteouts, or where it fails."""
    layers = [read for read in contents if isinstance(read, LayerContents)]
    if len(layers) < len(contents):
        return []  # a layer is unreadable: that check failed already
    whiteouts = any(layer.whiteouts for layer in layers)
    below_files = len(layers) > 1 and any(layer.implied_directories for layer in layers)
    if not (whiteouts or below_files):
        return []  # nothing the two could disagree on
    counted = tally([layer.rows for layer in layers])
    if not counted.contested and not whiteouts:
        return []
    found = "overlayfs and vfs agree"
    if counted.contested:
        found = f"they differ at {counted.contested}: " + ", ".join(counted.contested_paths)
    name = "layers every loader applies alike"
    return [Check(name, not counted.contested, "overlayfs and vfs agree", found)]


def _read_each(
    source: Source,
    image: Image[StoredLayer],
    options: ReadOptions,
    on_layer: OnLayer | None,
) -> list[LayerContents | ArchiveError]:
    """Each layer read, or the error that stopped it: a bad layer is a failed check."""
    try:
        if not any(map(_oversized, image.layers)):
            return list(read_layers(source, image, options, on_layer=on_layer))
    except TooMuchWork:
        raise
    except ArchiveError:
        pass  # find which ones fail, one by one
    by_location: dict[str, LayerContents | ArchiveError] = {}
    for layer in image.layers:
        if layer.location not in by_location and _oversized(layer):
            by_location[layer.location] = ArchiveError(
                f"not read: the blob is {layer.size} bytes, its descriptor says "
                f"{layer.declared_size}"
            )
        if layer.location not in by_location:
            try:
                by_location[layer.location] = layer.read(options)
            except ArchiveError as error:
                by_location[layer.location] = error
    return [by_location[layer.location] for layer in image.layers]


def _oversized(layer: StoredLayer) -> bool:
    """A blob bigger than its descriptor says is not hashed: it may be a terabyte of
    holes (a loader refuses it after reading the declared size)."""
    return layer.declared_size is not None and layer.size > layer.declared_size


def compare_layers(
    name: str, image: Image[StoredLayer], other_ids: list[str | None], other_config_digest: str
) -> tuple[list[Check], int | None]:
    """Layer-by-layer digest checks against another build; the first differing layer."""
    checks = []
    first_mismatch = None
    ours = [layer.diff_id for layer in image.layers]
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
    checks.append(Check.equal(f"{name} config digest", image.config_digest, other_config_digest))
    return checks, first_mismatch


def unreadable(error: ArchiveError, which: str = "archive") -> Verdict:
    """The verdict on an archive that cannot be read as an image at all (truncated,
    a blob missing, not an image): one failed check saying why."""
    return Verdict([Check(f"{which} readable", False, "a complete image archive", str(error))])


def check_other(verdict: Verdict, source: Source, image: Image[StoredLayer]) -> None:
    """Add to `verdict` every check of the other archive's own consistency: it is
    compared by its bytes, as strictly as the first, never by what it claims."""
    for check in check_archive(source, image).checks:
        verdict.checks.append(replace(check, name=f"other archive {check.name}"))


def compare_images(
    verdict: Verdict, name: str, image: Image[StoredLayer], other: Image[StoredLayer]
) -> None:
    """Add to `verdict` the digest checks of `image` against `other`, and the files of
    the first layer that differs."""
    other_ids = [layer.diff_id for layer in other.layers]
    checks, first = compare_layers(name, image, other_ids, other.config_digest)
    verdict.checks.extend(checks)
    verdict.checks.extend(compare_blobs(name, image, other))
    if first is None or first > min(len(image.layers), len(other.layers)):
        return
    ours = image.layers[first - 1].read(EVERYTHING)
    theirs = other.layers[first - 1].read(EVERYTHING)
    files = compare_files(ours.files or [], theirs.files or [], FILE_FIELDS)
    verdict.mismatch = Mismatch(first, files)


def compare_blobs(name: str, image: Image[StoredLayer], other: Image[StoredLayer]) -> list[Check]:
    """Where both images store layers as digested blobs (OCI), the blobs' digests:
    a layer whose tar is the same but whose blob is not was compressed otherwise,
    which the check says, naming each compressor where a build recorded it."""
    checks = []
    for number, (ours, theirs) in enumerate(zip(image.layers, other.layers, strict=False), 1):
        if ours.digest is None or theirs.digest is None:
            continue
        found = theirs.digest
        if ours.digest != theirs.digest and ours.diff_id == theirs.diff_id:
            found += (
                f" (the same tar, compressed otherwise: by {theirs.compressed_by or 'unrecorded'}"
                f" there, by {ours.compressed_by or 'unrecorded'} here)"
            )
        checks.append(
            Check(f"{name} layer {number} blob", ours.digest == theirs.digest, ours.digest, found)
        )
    return checks


def compare_with_rebuild(
    verdict: Verdict, image: Image[StoredLayer], build: Callable[[int], Any]
) -> None:
    """Add to `verdict` the checks of `image` against what `build(fd)` streams to `fd`."""
    rebuilt, source = read_rebuild(build)
    with source:
        compare_images(verdict, "rebuild", image, rebuilt)


def read_rebuild(build: Callable[[int], Any]) -> tuple[Image[StoredLayer], StreamSource]:
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
