"""`diff-layers`: how two images differ, down to files and config fields.

Layers are aligned by diff_id (shared, only in A, only in B). Files are
compared in each pair of differing layers at the same position, and in the
merged filesystems, field by field as diffoci does: type, mode, owner,
mtime, size, link target and content sha256. Timestamps and ownership can
be ignored. With a report directory, both versions of each modified regular
file are written out (under sanitised paths) for diffoscope or `diff -r`.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ArchiveError, InputError
from ..formats.layer_tar import EVERYTHING, FileRecord, LayerContents, ReadOptions
from ..formats.sources import Source
from ..formats.stored_layer import StoredLayer
from ..model import Image
from ..tar.reader import normalise_member_name
from .overlay import merged_filesystem
from .read import read_layers

TIMESTAMP_FIELDS = ("mtime",)
OWNERSHIP_FIELDS = ("uid", "gid", "uname", "gname")
FILE_FIELDS = (
    "type",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "mtime",
    "size",
    "linkname",
    "sha256",
    "xattrs",
)


# Both archives are read with everything: a stream is read once, and which
# layers need their files hashed is only known once both images are.
READ_OPTIONS = EVERYTHING


@dataclass
class Side:
    """One image under comparison."""

    source: Source
    image: Image[StoredLayer]


@dataclass(frozen=True)
class Ignore:
    timestamps: bool = False
    ownership: bool = False

    def fields(self) -> tuple[str, ...]:
        skipped = (TIMESTAMP_FIELDS if self.timestamps else ()) + (
            OWNERSHIP_FIELDS if self.ownership else ()
        )
        return tuple(f for f in FILE_FIELDS if f not in skipped)

    @property
    def any(self) -> bool:
        return self.timestamps or self.ownership


@dataclass
class FieldChange:
    """A field that differs: of a file's record, or of the config (a dotted path)."""

    field: str
    a: Any
    b: Any
    # Config changes only: "value", or "serialisation" when the configs hold the
    # same fields in other bytes (the image IDs differ all the same).
    kind: str | None = None

    def to_json(self) -> dict[str, Any]:
        document = {"field": self.field, "a": self.a, "b": self.b}
        if self.kind is not None:
            document["kind"] = self.kind
        return document


@dataclass
class FileChange:
    path: str
    change: str  # "added", "removed" or "modified"
    fields: list[FieldChange]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "change": self.change,
            "fields": [field.to_json() for field in self.fields],
        }


@dataclass
class LayerDiff:
    """Layers at the same position whose diff_ids differ, and their files' differences."""

    index: int  # from 1
    a: str | None  # diff_id in A, None if A has fewer layers
    b: str | None
    files: list[FileChange]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "a": self.a,
            "b": self.b,
            "files": [change.to_json() for change in self.files],
        }


@dataclass
class LayerSets:
    shared: list[str]
    only_a: list[str]
    only_b: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"shared": self.shared, "only_a": self.only_a, "only_b": self.only_b}


@dataclass
class DiffReport:
    """What `diff-layers --json` prints (see README.md)."""

    identical: bool
    layers: LayerSets
    layer_diffs: list[LayerDiff]
    files: list[FileChange]
    config: list[FieldChange]

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "layers": self.layers.to_json(),
            "layer_diffs": [diff.to_json() for diff in self.layer_diffs],
            "files": [change.to_json() for change in self.files],
            "config": [change.to_json() for change in self.config],
        }

    def modified_contents(self) -> set[str]:
        """Paths whose contents differ: what a report directory holds."""
        return {
            change.path
            for change in self.files
            if change.change == "modified" and any(f.field == "sha256" for f in change.fields)
        }


# Layers the other image has at the same position: their files are the same
# files once their bytes are checked against the digests both images claim.
CHECKED_FILES = ReadOptions(hash_blob=True, hash_diff=True, keep_files=True, keep_records=True)


def read_for_diff(side: Side, same: set[int]) -> list[LayerContents]:
    """Every layer's entries, and its bytes checked against the digests the image
    claims for it (a layer is compared by its bytes, never by a claim); files'
    contents hashed unless the other image has the same layer at the same place."""
    hashed = [layer for layer in side.image.layers if layer.index not in same]
    plain = [layer for layer in side.image.layers if layer.index in same]
    stream = side.source.kind == "stream"  # read once, with everything
    by_index: dict[int, LayerContents] = {}
    for layers, wanted in ((hashed, EVERYTHING), (plain, CHECKED_FILES)):
        options = EVERYTHING if stream else wanted
        for layer, contents in zip(
            layers, read_layers(side.source, side.image, options, layers), strict=True
        ):
            _check_claims(side, layer, contents)
            by_index[layer.index] = contents
    return [by_index[layer.index] for layer in side.image.layers]


def _check_claims(side: Side, layer: StoredLayer, contents: LayerContents) -> None:
    for claim in layer.digest_claims(contents):
        if not claim.holds:
            raise ArchiveError(
                f"{side.source.name}: layer {layer.index}'s bytes hash to {claim.found}, "
                f"its {claim.what} says {claim.claimed}: the archive is damaged "
                "(see `guix-image verify`)"
            )


def diff_images(
    a: Side, b: Side, ignore: Ignore
) -> tuple[DiffReport, list[LayerContents], list[LayerContents]]:
    """The differences as `diff-layers --json` documents them, and the layers read."""
    for side in (a, b):  # an image whose documents contradict themselves is damaged
        failed = [check for check in side.image.checks if not check.ok]
        if failed:
            check = failed[0]
            raise ArchiveError(
                f"{side.source.name}: {check.name}: expected {check.expected}, found "
                f"{check.actual}: the archive is damaged (see `guix-image verify`)"
            )
    ids_a = [layer.diff_id or "" for layer in a.image.layers]
    ids_b = [layer.diff_id or "" for layer in b.image.layers]
    shared = set(ids_a) & set(ids_b)
    same = {i + 1 for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x == y}
    layers_a = read_for_diff(a, same)
    layers_b = read_for_diff(b, same)
    fields = ignore.fields()
    layer_diffs = []
    for position in range(max(len(ids_a), len(ids_b))):
        id_a = ids_a[position] if position < len(ids_a) else None
        id_b = ids_b[position] if position < len(ids_b) else None
        if id_a == id_b:
            continue
        files = []
        if id_a is not None and id_b is not None:
            files = compare_files(
                _records(layers_a[position]), _records(layers_b[position]), fields
            )
        layer_diffs.append(LayerDiff(position + 1, id_a, id_b, files))
    merged_a, merged_b = merged(layers_a), merged(layers_b)
    files = compare_files(
        [record for record, _ in merged_a.values()],
        [record for record, _ in merged_b.values()],
        fields,
        # A record is the same file on both sides if it comes from the same
        # layer (same diff_id) at the same position.
        origin_a={path: (layer, ids_a[layer - 1]) for path, (_, layer) in merged_a.items()},
        origin_b={path: (layer, ids_b[layer - 1]) for path, (_, layer) in merged_b.items()},
    )
    config = compare_configs(a.image.config, b.image.config, ignore)
    if not ignore.any:
        config += serialisation(a.image, b.image)
    layers = LayerSets(
        shared=[i for i in ids_a if i in shared],
        only_a=[i for i in ids_a if i not in shared],
        only_b=[i for i in ids_b if i not in shared],
    )
    # Without --ignore-*, other layers (or the same in another order) are a difference.
    bytes_differ = ids_a != ids_b and not ignore.any
    identical = not files and not config and not any(d.files for d in layer_diffs)
    report = DiffReport(identical and not bytes_differ, layers, layer_diffs, files, config)
    return report, layers_a, layers_b


def _records(layer: LayerContents) -> list[FileRecord]:
    return layer.files or []


def merged(contents: list[LayerContents]) -> dict[str, tuple[FileRecord, int]]:
    """The merged filesystem: each path's record and layer (read with keep_records)."""
    return {
        survivor.path: (survivor.record(), survivor.layer)
        for survivor in merged_filesystem([layer.rows for layer in contents])
    }


def compare_files(
    a: Iterable[FileRecord],
    b: Iterable[FileRecord],
    fields: tuple[str, ...],
    *,
    origin_a: dict[str, tuple[int, str]] | None = None,
    origin_b: dict[str, tuple[int, str]] | None = None,
) -> list[FileChange]:
    """Added, removed and modified entries between two lists of records."""
    by_path_a = {record.path: record for record in a}
    by_path_b = {record.path: record for record in b}
    changes: list[FileChange] = []
    for path in sorted(by_path_a.keys() | by_path_b.keys(), key=_sort_key):
        old, new = by_path_a.get(path), by_path_b.get(path)
        if old is None:
            changes.append(FileChange(path, "added", []))
        elif new is None:
            changes.append(FileChange(path, "removed", []))
        else:
            if origin_a is not None and origin_b is not None and origin_a[path] == origin_b[path]:
                continue  # the same layer at the same place: the same file, hashed or not
            changed = [
                FieldChange(
                    name, _shown(name, getattr(old, name)), _shown(name, getattr(new, name))
                )
                for name in fields
                if getattr(old, name) != getattr(new, name)
                and not (name == "sha256" and (old.sha256 is None or new.sha256 is None))
            ]
            if changed:
                changes.append(FileChange(path, "modified", changed))
    return changes


def _shown(field: str, value: Any) -> Any:
    """A field's value as reports show it: modes in octal ("0644"), as inspect lists them."""
    return f"{value:04o}" if field == "mode" and isinstance(value, int) else value


def compare_configs(a: dict[str, Any], b: dict[str, Any], ignore: Ignore) -> list[FieldChange]:
    """Differing config fields, as dotted paths (rootfs is compared as layers)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    skipped = ("rootfs",)
    differences = []
    for key in sorted(flat_a.keys() | flat_b.keys()):
        if key.startswith(skipped):
            continue
        if ignore.timestamps and (key == "created" or key.endswith(".created")):
            continue
        if flat_a.get(key) != flat_b.get(key):
            differences.append(FieldChange(key, flat_a.get(key), flat_b.get(key), "value"))
    return differences


def serialisation(a: Image[StoredLayer], b: Image[StoredLayer]) -> list[FieldChange]:
    """The configs' bytes, where they differ with the same fields: the image IDs
    differ, so the images are not the same, as verify --against says too."""
    if a.config_digest == b.config_digest or a.config != b.config:
        return []
    return [FieldChange("(config bytes)", a.config_digest, b.config_digest, "serialisation")]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        flat = {}
        for i, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{i}]"))
        return flat
    return {prefix: value}


def _sort_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


# -- the report directory -------------------------------------------------------


def write_report(
    directory: str, side_name: str, side: Side, contents: list[LayerContents], paths: set[str]
) -> int:
    """Write the merged-filesystem version of each of `paths` under DIR/<side_name>/."""
    if side.source.kind == "stream":
        raise InputError("--report-dir needs archives read from files, not standard input")
    filesystem = merged(contents)
    wanted: dict[int, set[str]] = {}
    for path in paths:
        record, layer = filesystem.get(path, (None, 0))
        if record is not None and record.type == "file":
            wanted.setdefault(layer, set()).add(path)
    root = _report_root(directory, side_name)
    written = 0
    for number, layer_paths in sorted(wanted.items()):
        written += _copy_out(side.image.layers[number - 1], layer_paths, root)
    return written


def _report_root(directory: str, side_name: str) -> str:
    os.makedirs(directory, exist_ok=True)
    root = os.path.join(os.path.realpath(directory), side_name)
    _make_directory(root)
    return root


def _copy_out(layer: StoredLayer, paths: set[str], root: str) -> int:
    written = 0
    with layer.tar_reader() as reader:
        for member in reader:
            path = normalise_member_name(member.name)
            if member.isreg() and path in paths:
                with _create(root, path) as out:
                    for chunk in reader.iter_content():
                        out.write(chunk)
                    os.fchmod(out.fileno(), member.mode & 0o777)  # its mode, never set-id
                written += 1
    return written


METADATA_FILE = "metadata-changes.json"


def write_metadata_changes(directory: str, report: DiffReport) -> int:
    """DIR/metadata-changes.json: the files of the merged filesystems whose metadata
    alone changed (mode, owner, times, link target, xattrs), which no file copy shows.
    How many there are."""
    changes = [
        change.to_json()
        for change in report.files
        if change.change == "modified" and all(f.field != "sha256" for f in change.fields)
    ]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.path.realpath(directory), METADATA_FILE)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        raise InputError(f"report directory: cannot write {path}: {error.strerror}") from None
    with open(fd, "w") as out:
        out.write(json.dumps(changes, indent=2, ensure_ascii=True) + "\n")
    return len(changes)


def _make_directory(path: str) -> None:
    """mkdir that never follows or reuses anything but a real directory."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise InputError(f"report directory: {path} exists and is not a directory") from None


@contextlib.contextmanager
def _create(root: str, member_path: str) -> Any:
    """Open root/<member_path> for writing: sanitised, inside root, never through links."""
    parts = [p for p in member_path.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise InputError(f"report directory: cannot name a file for {member_path!r}")
    try:
        current = root
        for part in parts[:-1]:
            current = os.path.join(current, part)
            _make_directory(current)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(os.path.join(current, parts[-1]), flags, 0o644)
    except (OSError, ValueError) as error:  # a NUL, a name too long, a link in the way
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise InputError(f"report directory: cannot write {member_path!r}: {reason}") from None
    with open(fd, "wb") as out:
        yield out
