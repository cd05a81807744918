"""`verify --store`: is what is in the image exactly what is in the store?

Every store item the image holds (a top-level entry of the store directory,
in any layer, a base image's too) is serialised as a NAR from the layer's
entries as they stream past, and its sha256 compared with the hash the
store database registered for it. Every reference the database records for
an item must be in the image as well (a closure with a hole fails), and an
item shipped in more than one layer is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..formats.sources import Source
from ..formats.stored_layer import StoredLayer
from ..model import Check, Image
from ..store.database import StoreDatabase
from ..store.nar import NarHasher, NotNarOrder
from ..store.paths import STORE_DIRS
from ..tar.format import DIRTYPE, REGTYPE, SYMTYPE
from ..tar.reader import TarMember, TarReader, normalise_member_name

SHOWN = 10  # paths named in a check, at most


@dataclass
class _Item:
    """A store item as found in one layer."""

    path: str  # "/gnu/store/...-name"
    layer: int
    hasher: NarHasher = field(default_factory=NarHasher)
    problem: str | None = None
    nar_hash: str | None = None

    def finish(self) -> None:
        if self.problem is None:
            try:
                self.nar_hash = self.hasher.finish()
            except NotNarOrder as error:
                self.problem = str(error)


def check_against_store(
    source: Source, image: Image[StoredLayer], store_dir: str | None, database_path: str | None
) -> list[Check]:
    """The checks of the image's store items against the store database."""
    if source.kind == "stream":
        raise InputError("--store reads layers twice: give an archive file or a layout directory")
    found: list[_Item] = []
    for layer in image.layers:
        found.extend(_items_of(layer, store_dir))
    directories = {item.path.rsplit("/", 1)[0] for item in found}
    if store_dir is None:
        if len(directories) > 1:
            raise InputError(
                f"the image holds items of {' and '.join(sorted(directories))}: "
                "choose one with --store DIR"
            )
        store_dir = directories.pop() if directories else STORE_DIRS[0]
    database = StoreDatabase(database_path) if database_path else StoreDatabase.find(store_dir)
    if database is None:
        raise InputError(f"no store database found for {store_dir}: give it with --db PATH")
    try:
        return _checks(found, database)
    finally:
        database.close()


def _items_of(layer: StoredLayer, store_dir: str | None) -> list[_Item]:
    """The store items of a layer, each hashed as a NAR from its entries."""
    prefixes = [d.strip("/") + "/" for d in ([store_dir] if store_dir else STORE_DIRS)]
    items: dict[str, _Item] = {}
    current: _Item | None = None
    with layer.tar_reader() as reader:
        for member in reader:
            path = normalise_member_name(member.name)
            prefix = next((p for p in prefixes if path.startswith(p)), None)
            if prefix is None or len(path) == len(prefix):
                continue
            top, _, inside = path[len(prefix) :].partition("/")
            item_path = "/" + prefix + top
            if current is None or current.path != item_path:
                if current is not None:
                    current.finish()
                if item_path in items:  # met again, after another item's entries
                    items[item_path].problem = "its entries are not together in the layer"
                    current = items[item_path]
                    continue
                current = items[item_path] = _Item(item_path, layer.index)
            if current.problem is None:
                try:
                    _add(current.hasher, inside.encode("utf-8", "surrogateescape"), member, reader)
                except NotNarOrder as error:
                    current.problem = str(error)
        if current is not None:
            current.finish()
    return list(items.values())


def _add(hasher: NarHasher, inside: bytes, member: TarMember, reader: TarReader) -> None:
    if member.type == DIRTYPE:
        hasher.directory(inside)
    elif member.type == SYMTYPE:
        hasher.symlink(inside, member.linkname.encode("utf-8", "surrogateescape"))
    elif member.type == REGTYPE:
        executable = bool(member.mode & 0o100)
        hasher.regular(inside, member.size, executable, reader.iter_content())
    else:
        raise NotNarOrder(f"{inside!r} is a {member.type_name}, which a NAR cannot hold")


def _checks(found: list[_Item], database: StoreDatabase) -> list[Check]:
    paths = sorted({item.path for item in found})
    unknown = [path for path in paths if database.nar_hash(path) is None]
    wrong = []
    for item in found:
        registered = database.nar_hash(item.path)
        if registered is None:
            continue
        if item.problem is not None:
            wrong.append(f"{item.path} (layer {item.layer}): cannot hash: {item.problem}")
        elif item.nar_hash != registered:
            wrong.append(
                f"{item.path} (layer {item.layer}): {item.nar_hash}, registered {registered}"
            )
    missing = []
    present = set(paths)
    for path in paths:
        for reference in database.references(path) or []:
            if reference not in present:
                missing.append(f"{path} refers to {reference}")
    layers: dict[str, list[int]] = {}
    for item in found:
        layers.setdefault(item.path, []).append(item.layer)
    twice = [
        f"{path} (layers {', '.join(map(str, numbers))})"
        for path, numbers in sorted(layers.items())
        if len(numbers) > 1
    ]
    count = f"{len(paths)} store items"
    return [
        _check("store items registered in the store", f"all {count}", unknown),
        _check("store items' NAR hashes", "as registered", wrong),
        _check("store closure complete", "every reference in the image", missing),
        _check("store items in one layer each", "each once", twice),
    ]


def _check(name: str, expected: str, problems: list[str]) -> Check:
    """Passed if there are no problems; else the first few, and how many."""
    if not problems:
        return Check(name, True, expected, expected)
    shown = "; ".join(problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return Check(name, False, expected, f"{len(problems)}: {shown}{more}")
