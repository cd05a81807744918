"""`inspect`: what an image is made of, layer by layer, and what it wastes.

The merged filesystem is built as loaders build it: layers applied in
order, whiteouts (`.wh.NAME`) deleting lower entries and opaque whiteouts
(`.wh..wh..opq`) hiding a directory's lower contents. Bytes of lower-layer
files that a higher layer overwrites or deletes are in the image but not in
its filesystem: that is the waste dive reports.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .archive import Source
from .image import ImageRecord, LayerRef
from .layer_contents import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, FileRecord, LayerContents, ReadOptions

TOP_OFFENDERS = 10


def read_layers(
    source: Source, image: ImageRecord, options: ReadOptions, refs: list[LayerRef] | None = None
) -> list[LayerContents]:
    """Read layers (all by default), two at a time: hashing releases the GIL."""
    chosen = image.layers if refs is None else refs
    if source.kind == "stream" or len(chosen) < 2:
        return [source.read_layer(ref, options) for ref in chosen]
    with ThreadPoolExecutor(2, "guix-image-read") as pool:
        return list(pool.map(lambda ref: source.read_layer(ref, options), chosen))


@dataclass
class MergedEntry:
    record: FileRecord
    layer: int  # from 1


@dataclass
class Waste:
    bytes: int = 0
    # path -> (wasted bytes, layers the path appears in)
    offenders: dict[str, list[Any]] = field(default_factory=dict)

    def note(self, path: str, size: int, layer: int) -> None:
        entry = self.offenders.setdefault(path, [0, []])
        entry[0] += size
        if layer not in entry[1]:
            entry[1].append(layer)
        self.bytes += size


def merge_layers(layers: list[list[FileRecord]]) -> tuple[dict[str, MergedEntry], Waste]:
    """The filesystem the layers make together, and the bytes hidden in lower layers."""
    merged: dict[str, MergedEntry] = {}
    children: dict[str, set[str]] = {}  # directory -> paths directly inside it
    waste = Waste()

    def remove(path: str, by_layer: int) -> None:
        entry = merged.pop(path, None)
        if entry is not None:
            if entry.record.type == "file" and entry.record.size:
                waste.note(path, entry.record.size, entry.layer)
                waste.offenders[path][1].append(by_layer)
            _parent_set(children, path).discard(path)
        for child in list(children.pop(path, ())):
            remove(child, by_layer)

    for number, records in enumerate(layers, 1):
        for record in records:
            if not record.path:  # the layer's root, "./"
                continue
            directory, _, name = record.path.rpartition("/")
            if name == OPAQUE_WHITEOUT:
                for child in list(children.get(directory, ())):
                    if merged[child].layer < number:
                        remove(child, number)
                continue
            if name.startswith(WHITEOUT_PREFIX):
                hidden = f"{directory}/{name[len(WHITEOUT_PREFIX) :]}".lstrip("/")
                remove(hidden, number)
                continue
            previous = merged.get(record.path)
            if previous is not None and not (previous.record.type == record.type == "dir"):
                remove(record.path, number)
            merged[record.path] = MergedEntry(record, number)
            _parent_set(children, record.path).add(record.path)
    for path in waste.offenders:
        waste.offenders[path][1] = sorted(set(waste.offenders[path][1]))
    return merged, waste


def _parent_set(children: dict[str, set[str]], path: str) -> set[str]:
    return children.setdefault(path.rpartition("/")[0], set())


def duplicated_paths(layers: list[list[FileRecord]]) -> dict[str, list[int]]:
    """Regular files present in more than one layer, with those layers."""
    seen: dict[str, list[int]] = {}
    for number, records in enumerate(layers, 1):
        for record in records:
            if record.type == "file":
                seen.setdefault(record.path, []).append(number)
    return {path: numbers for path, numbers in seen.items() if len(numbers) > 1}


def summarize(
    source: Source,
    image: ImageRecord,
    contents: list[LayerContents],
) -> dict[str, Any]:
    """The facts `inspect --json` documents (see README.md)."""
    history = image.layer_history()
    layers = []
    for ref, layer, entry in zip(image.layers, contents, history, strict=True):
        layers.append(
            {
                "index": ref.index,
                "diff_id": ref.diff_id,
                "digest": ref.digest,
                "media_type": ref.media_type,
                "compression": layer.compression,
                "size": ref.size,
                "uncompressed_size": layer.size,
                "entries": layer.entries,
                "comment": entry.get("comment"),
                "created_by": entry.get("created_by"),
            }
        )
    records = [layer.files or [] for layer in contents]
    merged, waste = merge_layers(records)
    duplicates = duplicated_paths(records)
    total = sum(ref.size for ref in image.layers)
    offenders = sorted(waste.offenders.items(), key=lambda item: (-item[1][0], item[0]))
    settings = image.settings
    return {
        "format": image.format,
        "repo_tags": image.repo_tags,
        "config_digest": image.config_digest,
        "architecture": image.config.get("architecture"),
        "os": image.config.get("os"),
        "created": image.config.get("created"),
        "config": settings,
        "layers": layers,
        "total_size": total,
        "files": len(merged),
        "waste": {
            "bytes": waste.bytes,
            "efficiency": round(1 - waste.bytes / total, 4) if total else 1.0,
            "largest": [
                {"path": path, "bytes": wasted, "layers": layer_numbers}
                for path, (wasted, layer_numbers) in offenders[:TOP_OFFENDERS]
            ],
            "duplicated_files": len(duplicates),
        },
    }


def layer_files(contents: LayerContents) -> list[dict[str, Any]]:
    return [record.to_json() for record in contents.files or []]


def merged_files(contents: list[LayerContents]) -> list[dict[str, Any]]:
    merged, _ = merge_layers([layer.files or [] for layer in contents])
    return [
        {**entry.record.to_json(), "layer": entry.layer}
        for _, entry in sorted(
            merged.items(), key=lambda item: item[0].encode("utf-8", "surrogateescape")
        )
    ]
