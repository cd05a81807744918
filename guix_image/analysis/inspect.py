"""`inspect`: what an image is made of, layer by layer, what it wastes, and its files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..formats.layer_tar import FILES, PATHS, FileRecord, LayerContents, ReadOptions
from ..formats.sources import Source
from ..formats.stored_layer import StoredLayer
from ..model import Image
from .overlay import duplicated_paths, merge_layers
from .read import read_layers

TOP_OFFENDERS = 10
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
    config_digest: str
    architecture: Any
    os: Any
    created: Any
    config: dict[str, Any]
    layers: list[LayerSummary]
    total_size: int
    files: int
    waste: WasteSummary
    listing: list[ListedFile] | None = None  # with --files

    def to_json(self) -> dict[str, Any]:
        document = {
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
        if self.listing is not None:
            document["listing"] = [entry.to_json() for entry in self.listing]
        return document


def read_options(files: str | int | None, from_stream: bool) -> ReadOptions:
    """What to read of every layer: full records only where they are listed.

    A stream is read once, before the layer to list is known, so it keeps
    full records of every layer as soon as any is listed.
    """
    return FILES if files == ALL or (from_stream and files is not None) else PATHS


def inspect_image(
    source: Source, image: Image[StoredLayer], files: str | int | None = None
) -> InspectReport:
    """The summary, and with `files` (a layer number, or ALL) a listing.

    The layers are read with `read_options(files, ...)`, which the source
    of a stream must have been opened with.
    """
    options = read_options(files, source.kind == "stream")
    contents = read_layers(source, image, options)
    if isinstance(files, int) and contents[files - 1].files is None:
        contents[files - 1] = image.layers[files - 1].read(FILES)
    report = summarize(image, contents)
    if files == ALL:
        report.listing = merged_files(contents)
    elif isinstance(files, int):
        report.listing = [ListedFile(record) for record in contents[files - 1].files or []]
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
        )
        for layer, read, entry in zip(image.layers, contents, history, strict=True)
    ]
    records = [layer.entry_list() for layer in contents]
    merged, waste = merge_layers(records)
    duplicates = duplicated_paths(records)
    total = sum(layer.size for layer in image.layers)
    # Waste is in uncompressed bytes, so the efficiency is too (as dive's).
    unpacked = sum(
        read.size if read.size is not None else layer.size
        for layer, read in zip(image.layers, contents, strict=True)
    )
    offenders = sorted(waste.offenders.items(), key=lambda item: (-item[1][0], item[0]))
    return InspectReport(
        format=image.format,
        repo_tags=image.repo_tags,
        config_digest=image.config_digest,
        architecture=image.config.get("architecture"),
        os=image.config.get("os"),
        created=image.config.get("created"),
        config=image.settings,
        layers=layers,
        total_size=total,
        files=len(merged),
        waste=WasteSummary(
            bytes=waste.bytes,
            efficiency=round(1 - waste.bytes / unpacked, 4) if unpacked else 1.0,
            largest=[
                Offender(path, wasted, layer_numbers)
                for path, (wasted, layer_numbers) in offenders[:TOP_OFFENDERS]
            ],
            duplicated_files=len(duplicates),
        ),
    )


def merged_files(contents: list[LayerContents]) -> list[ListedFile]:
    merged, _ = merge_layers([layer.files or [] for layer in contents])
    return [
        ListedFile(entry.record, entry.layer)
        for _, entry in sorted(
            merged.items(), key=lambda item: item[0].encode("utf-8", "surrogateescape")
        )
    ]
