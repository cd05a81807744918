"""`inspect`: what an image is made of, layer by layer, what it wastes, and its files."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..formats.layer_tar import HEADERS, RECORDS, FileRecord, LayerContents, ReadOptions
from ..formats.sources import Source
from ..formats.stored_layer import StoredLayer
from ..model import Image
from .overlay import merged_filesystem, tally
from .read import read_layers

ALL = "all"  # --files with no layer number: the merged filesystem


@dataclass
class LayerSummary:
    index: int  # from 1
    diff_id: str | None
    digest: str | None  # the blob's, OCI only
    media_type: str | None
    compression: str
    size: int  # bytes as stored
    uncompressed_size: int | None
    entries: int
    comment: str | None
    created_by: str | None
    compressed_by: str | None = None  # as a guix-image build recorded it (OCI)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Offender:
    """A path whose bytes are shipped in lower layers and hidden by higher ones."""

    path: str
    bytes: int
    layers: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "layers": self.layers}


@dataclass
class WasteSummary:
    bytes: int
    efficiency: float  # 1 - waste / uncompressed total, as dive's
    largest: list[Offender]
    duplicated_files: int

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "efficiency": self.efficiency,
            "largest": [offender.to_json() for offender in self.largest],
            "duplicated_files": self.duplicated_files,
        }


@dataclass
class ListedFile:
    """An entry of a listing, and in the merged view the layer it comes from."""

    record: FileRecord
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        document = self.record.to_json()
        if self.layer is not None:
            document["layer"] = self.layer
        return document


@dataclass
class InspectReport:
    """What `inspect --json` prints (see README.md)."""

    format: str
    repo_tags: list[str]
    # What does not add up (said on stderr): failed checks of the image's own
    # documents, a media type that names another compression than the bytes'.
    warnings: list[str]
    config_digest: str
    architecture: Any
    os: Any
    created: Any
    config: dict[str, Any]
    layers: list[LayerSummary]
    total_size: int
    files: int
    waste: WasteSummary
    # With --files: the entries, produced as they are read (once), in bounded memory.
    listing: Iterable[ListedFile] | None = None

    def to_json(self) -> dict[str, Any]:
        """The whole report; its listing (if any) is consumed."""
        document = self.summary_json()
        if self.listing is not None:
            document["listing"] = [entry.to_json() for entry in self.listing]
        return document

    def summary_json(self) -> dict[str, Any]:
        """The report without its listing, which `to_json` puts last."""
        return {
            "format": self.format,
            "repo_tags": self.repo_tags,
            "config_digest": self.config_digest,
            "architecture": self.architecture,
            "os": self.os,
            "created": self.created,
            "config": self.config,
            "layers": [layer.to_json() for layer in self.layers],
            "total_size": self.total_size,
            "files": self.files,
            "waste": self.waste.to_json(),
        }


def read_options(files: str | int | None, from_stream: bool) -> ReadOptions:
    """What to read of every layer: full records only where they are listed.

    A stream is read once, before the layer to list is known, so it keeps
    full records of every layer as soon as any is listed.
    """
    return RECORDS if files == ALL or (from_stream and files is not None) else HEADERS


def inspect_image(
    source: Source, image: Image[StoredLayer], files: str | int | None = None
) -> InspectReport:
    """The summary, and with `files` (a layer number, or ALL) a listing.

    The layers are read with `read_options(files, ...)`, which the source
    of a stream must have been opened with.
    """
    options = read_options(files, source.kind == "stream")
    contents = read_layers(source, image, options)
    report = summarize(image, contents)
    if files == ALL:
        report.listing = merged_files(contents)
    elif isinstance(files, int):
        listed = contents[files - 1]
        if not options.keep_records:
            listed = image.layers[files - 1].read(RECORDS)
        report.listing = map(ListedFile, listed.records_in_archive_order())
    return report


def summarize(image: Image[StoredLayer], contents: list[LayerContents]) -> InspectReport:
    history = image.layer_history()
    layers = [
        LayerSummary(
            index=layer.index,
            diff_id=layer.diff_id,
            digest=layer.digest,
            media_type=layer.media_type,
            compression=read.compression,
            size=layer.size,
            uncompressed_size=read.size,
            entries=read.entries,
            comment=entry.get("comment"),
            created_by=entry.get("created_by"),
            compressed_by=layer.compressed_by,
        )
        for layer, read, entry in zip(image.layers, contents, history, strict=True)
    ]
    counted = tally([layer.rows for layer in contents])
    total = sum(layer.size for layer in image.layers)
    # Waste is in uncompressed bytes, so the efficiency is too (as dive's).
    unpacked = sum(
        read.size if read.size is not None else layer.size
        for layer, read in zip(image.layers, contents, strict=True)
    )
    warnings = [
        f"{check.name}: expected {check.expected}, found {check.actual}"
        for check in image.checks
        if not check.ok
    ]
    for layer, read in zip(image.layers, contents, strict=True):
        claim = layer.compression_claim(read)
        if claim is not None and not claim.holds:
            warnings.append(
                f"layer {layer.index}: its media type {layer.media_type} says "
                f"{claim.claimed}, its bytes are {claim.found}"
            )
    return InspectReport(
        warnings=warnings,
        format=image.format,
        repo_tags=image.repo_tags,
        config_digest=image.config_digest,
        architecture=image.config.get("architecture"),
        os=image.config.get("os"),
        created=image.config.get("created"),
        config=image.settings,
        layers=layers,
        total_size=total,
        files=counted.files,
        waste=WasteSummary(
            bytes=counted.waste_bytes,
            efficiency=round(1 - counted.waste_bytes / unpacked, 4) if unpacked else 1.0,
            largest=[Offender(*offender) for offender in counted.largest()],
            duplicated_files=counted.duplicated_files,
        ),
    )


def merged_files(contents: list[LayerContents]) -> Iterator[ListedFile]:
    """The merged filesystem in tree order (the layers read with keep_records)."""
    for survivor in merged_filesystem([layer.rows for layer in contents]):
        yield ListedFile(survivor.record(), survivor.layer)
