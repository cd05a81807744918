"""Archives crafted for the tests: byte by byte where `tarfile` cannot write the trick.

Raw tar members (`header`, `member`, `pax`, `tar`, ...), Docker archives and
OCI layouts to tamper with (`docker_entries`, `oci_files`, ...), bombs built
fast, and layer tars and archives made with Python's tarfile (`layer_tar`,
`archive_of`); `read_archive` reads one of ours back with tarfile.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

BLOCK = 512
END = bytes(2 * BLOCK)
MiB = 1 << 20
GiB = 1 << 30

# -- raw tar writing ------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value


def header(
    name: str | bytes,
    *,
    size: int = 0,
    typeflag: bytes = b"0",
    linkname: str | bytes = b"",
    size_field: bytes | None = None,
    checksum: int | None = None,
) -> bytes:
    """One 512-byte ustar header; `size_field` and `checksum` override what is stored."""
    raw_name, raw_link = _bytes(name), _bytes(linkname)
    assert len(raw_name) <= 100 and len(raw_link) <= 100
    block = bytearray(BLOCK)
    block[0 : len(raw_name)] = raw_name
    block[100:108] = _octal(0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12) if size_field is None else size_field
    block[136:148] = _octal(1_700_000_000, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157 : 157 + len(raw_link)] = raw_link
    block[257:265] = b"ustar\x0000"
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[148:156] = b"%06o\0 " % (sum(block) if checksum is None else checksum)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str | bytes, data: bytes = b"", **fields: object) -> bytes:
    """A header and its padded content (the header's size is the content's unless overridden)."""
    fields.setdefault("size", len(data))
    return header(name, **fields) + padded(data)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> bytes:
    return header(name, typeflag=b"2", linkname=target)


def hardlink(name: str, target: str) -> bytes:
    return header(name, typeflag=b"1", linkname=target)


def pax_record(key: str, value: str | bytes) -> bytes:
    body = b" " + key.encode() + b"=" + _bytes(value) + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax(*records: bytes) -> bytes:
    """A PAX extended header member holding `records` (raw, so they can be malformed)."""
    return member("././@PaxHeader", b"".join(records), typeflag=b"x")


def tar(*members: bytes) -> bytes:
    return b"".join(members) + END


def base256(value: int) -> bytes:
    return b"\x80" + value.to_bytes(11, "big")


# -- images ---------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_name(data: bytes) -> str:
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


LAYER = tar(member("etc/", typeflag=b"5"), member("etc/hello", b"hello\n"))
LAYER_NAME = "001/layer.tar"


def image_config(diff_ids: list[str], **extra: object) -> bytes:
    document: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    document.update(extra)
    return json.dumps(document).encode()


def config_name(config: bytes) -> str:
    return hashlib.sha256(config).hexdigest() + ".json"


def docker_entries(
    layers: Iterable[bytes] = (LAYER,),
    *,
    names: list[str] | None = None,
    config: bytes | None = None,
    diff_ids: list[str] | None = None,
    manifest: bytes | None = None,
    layer_names: list[str] | None = None,
) -> list[tuple[str, bytes]]:
    """(member name, content) of a Docker archive, in `docker save` order, to be tampered with."""
    layers = list(layers)
    names = names or [f"{i:03d}/layer.tar" for i in range(1, len(layers) + 1)]
    if config is None:
        config = image_config([sha256(layer) for layer in layers] if diff_ids is None else diff_ids)
    if manifest is None:
        entry = {
            "Config": config_name(config),
            "RepoTags": ["hostile:1"],
            "Layers": names if layer_names is None else layer_names,
        }
        manifest = json.dumps([entry]).encode()
    return [
        *zip(names, layers, strict=True),
        (config_name(config), config),
        ("manifest.json", manifest),
    ]


def docker_archive(*extra: bytes, **options: object) -> bytes:
    entries = docker_entries(**options)  # type: ignore[arg-type]
    return tar(*(member(name, data) for name, data in entries), *extra)


def without(entries: list[tuple[str, bytes]], name: str) -> list[bytes]:
    return [member(n, d) for n, d in entries if n != name]


def manifest_of(entries: list[tuple[str, bytes]]) -> bytes:
    return dict(entries)["manifest.json"]


def oci_files(
    layers: Iterable[bytes] = (LAYER,),
    *,
    config: bytes | None = None,
    manifest: bytes | None = None,
    index: bytes | None = None,
    manifest_descriptor: dict[str, object] | None = None,
) -> dict[str, bytes]:
    """The files of an OCI layout (relative path -> content)."""
    layers = list(layers)
    config = config if config is not None else image_config([sha256(x) for x in layers])
    if manifest is None:
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
                "layers": [descriptor(x, "application/vnd.oci.image.layer.v1.tar") for x in layers],
            }
        ).encode()
    if index is None:
        entry = {**descriptor(manifest), **(manifest_descriptor or {})}
        index = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
    for blob in (config, manifest, *layers):
        files[blob_name(blob)] = blob
    return files


def descriptor(
    data: bytes, media_type: str = "application/vnd.oci.image.manifest.v1+json"
) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


def oci_archive(files: dict[str, bytes]) -> bytes:
    return tar(*(member(name, data) for name, data in files.items()))


def write_layout(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def the_manifest(files: dict[str, bytes]) -> str:
    """The blob path of the (only) image manifest of `files`."""
    digest = json.loads(files["index.json"])["manifests"][0]["digest"]
    return "blobs/sha256/" + digest.split(":", 1)[1]


# -- bombs and big archives, built fast ------------------------------------------


def gzip_of_zeros(total: int, chunk: int = MiB) -> bytes:
    """A valid one-member gzip of `total` zero bytes, built without deflating them all.

    After a full flush deflate forgets its history, so every further chunk of
    zeros compresses to the same bytes: compress one and repeat it.
    """
    assert total % chunk == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    steady = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert first == steady
    crc = 0
    for _ in range(total // chunk):
        crc = zlib.crc32(zeros, crc)
    body = steady * (total // chunk) + deflate.flush()
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + struct.pack("<II", crc, total % 2**32)
    )


def zstd_of_zeros(total: int, chunk: int = MiB) -> bytes:
    """One zstd frame of `total` zero bytes, streamed, declaring a 128 MiB window."""
    zstandard = pytest.importorskip("zstandard", reason="zstd bombs need the zstandard module")
    parameters = zstandard.ZstdCompressionParameters(window_log=27, compression_level=3)
    compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()
    zeros = bytes(chunk)
    parts = [compressor.compress(zeros) for _ in range(total // chunk)]
    return b"".join(parts) + compressor.flush()


def many_members(count: int) -> bytes:
    """`count` empty regular files m0000000 ... with correct checksums, quickly."""
    template = bytearray(header("m0000000"))
    template[148:156] = b" " * 8
    base = sum(template) - sum(b"m0000000")
    head, tail = bytes(template[8:148]), bytes(template[156:])
    blocks = []
    for i in range(count):
        name = b"m%07d" % i
        blocks.append(name + head + b"%06o\0 " % (base + sum(name)) + tail)
    return b"".join(blocks) + END


def layer_with_entries(count: int) -> bytes:
    """A gzipped layer of `count` empty files (compresses very well)."""
    names = many_members(count)
    return gzip_compress(names)


def gzip_compress(data: bytes) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


# -- with Python's tarfile --------------------------------------------------------


def layer_tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def archive_of(
    layers: list[bytes], target: Path, *, stored: list[bytes] | None = None, **config: Any
) -> Path:
    """A Docker archive of layer tars; `stored` are the blobs as written (compressed, say)."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    document = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        **config,
    }
    config_bytes = json.dumps(document).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    members = {f"{i}/layer.tar": layer for i, layer in enumerate(stored or layers)}
    members[config_name] = config_bytes
    members["manifest.json"] = json.dumps(
        [
            {
                "Config": config_name,
                "RepoTags": ["crafted:1"],
                "Layers": [f"{i}/layer.tar" for i in range(len(layers))],
            }
        ]
    ).encode()
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def archive_of_files(blobs: list[Path], diff_ids: list[str], target: Path) -> Path:
    """A Docker archive of layer blobs stored in files (too big to hold in memory)."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["crafted:1"],
            "Layers": [f"{i}/layer.tar" for i in range(len(blobs))],
        }
    ]
    with tarfile.open(target, "w") as tar:
        for i, blob in enumerate(blobs):
            tar.add(blob, f"{i}/layer.tar")
        for name, data in ((config_name, config), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def read_archive(path: Path) -> dict[str, Any]:
    """manifest, config and layer member bytes of a Docker archive, via Python's tarfile."""
    with tarfile.open(path) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(outer.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
        layers = [outer.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]
    return {"manifest": manifest, "config": config, "layers": layers}


def layer_members(layer: bytes) -> list[tarfile.TarInfo]:
    import io

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return tar.getmembers()


def flip_byte(data: bytearray, start: int, end: int) -> None:
    """Flip a bit of the byte halfway between `start` and `end`."""
    data[(start + end) // 2] ^= 0x40


# -- the tamper matrix ------------------------------------------------------------

TAMPERED = [
    (form, tamper)
    for form in ("docker-archive", "oci-archive", "oci", "oci-gzip", "oci-zstd")
    for tamper in ("flipped-byte", "wrong-size", "missing-blob")
    if (form, tamper) != ("docker-archive", "wrong-size")  # it has no descriptor sizes
]


def tamper_with(target: Path, tamper: str) -> None:
    """Damage an archive or a layout in place: one flipped byte in its last layer,
    that layer's blob removed, or the manifest's descriptor a byte too big."""
    files = files_of(target)
    if "index.json" in files:
        index = json.loads(files["index.json"])
        manifest = files["blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]]
        blob = "blobs/sha256/" + json.loads(manifest)["layers"][-1]["digest"].split(":")[1]
    else:
        blob = json.loads(files["manifest.json"])[0]["Layers"][-1]
    if tamper == "flipped-byte":
        data = bytearray(files[blob])
        flip_byte(data, 0, len(data))
        files[blob] = bytes(data)
    elif tamper == "missing-blob":
        del files[blob]
    else:
        index = json.loads(files["index.json"])
        index["manifests"][0]["size"] += 1
        files["index.json"] = json.dumps(index).encode()
    write_files(target, files)


def files_of(target: Path) -> dict[str, bytes]:
    """An archive's or a layout's files, by name."""
    if target.is_dir():
        return {
            path.relative_to(target).as_posix(): path.read_bytes()
            for path in target.rglob("*")
            if path.is_file()
        }
    with tarfile.open(target) as outer:
        return {m.name: outer.extractfile(m).read() for m in outer if m.isfile()}  # type: ignore[union-attr]


def write_files(target: Path, files: dict[str, bytes]) -> None:
    if target.is_dir():
        shutil.rmtree(target)
        for name, data in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
        return
    with tarfile.open(target, "w") as out:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
