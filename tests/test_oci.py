"""`build --format oci-archive|oci-dir --compress none|gzip|zstd`: OCI layouts with
reproducible compressed layers, checked by our readers, the system's gzip and
zstd, and skopeo, umoci, podman and docker."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import tarfile
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, cast

import pytest

from guix_image.build.cache import LayerCache
from guix_image.build.config import validate_config
from guix_image.build.engine import BuildResult, build_image
from guix_image.build.oci import OciOutput
from guix_image.build.store_layer import StaleCacheEntry
from guix_image.errors import InputError, OperationError
from guix_image.fastpath import only_thread
from guix_image.formats import compression as compression_module
from guix_image.formats.compression import (
    ANNOTATION,
    GZIP_HEADER,
    BlobWriter,
    Compression,
    choose,
)

from .support.cli import Cli, inspect_json
from .support.nar import nar_hash
from .support.stores import (
    StoreTree,
    busybox_store,
    disk_tree,
    make_database,
    populate,
    rootfs_tree,
)
from .support.tools import docker_answers, podman, require, run, unpack

# -- the compressors ------------------------------------------------------------------


def compress(data: bytes, method: str, level: int | None, pieces: list[int]) -> bytes:
    """`data` through a BlobWriter, handed over in pieces of the given sizes."""
    compression = choose(method, level)
    with tempfile.TemporaryFile() as f, compression.compressors() as compressors:
        writer = BlobWriter(f.fileno(), compression, compressors)
        position = 0
        for size in pieces:
            writer(memoryview(data)[position : position + size])
            position += size
        writer(memoryview(data)[position:])
        measured = writer.finish()
        f.seek(0)
        blob = f.read()
    assert measured.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert measured.size == len(blob)
    return blob


def sample(size: int) -> bytes:
    """Compressible but not trivial: words in a seeded random order."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


@pytest.mark.parametrize(("method", "level"), [("gzip", 1), ("gzip", 2), ("gzip", 6), ("zstd", 3)])
def test_a_blob_does_not_depend_on_how_its_tar_arrives(method: str, level: int) -> None:
    """The same bytes in any split (ISA-L's own output would depend on it)."""
    data = sample(5 << 20)
    whole = compress(data, method, level, [])
    rng = random.Random(level)
    splits = [[1 << 20] * 4, [rng.randint(1, 3 << 20) for _ in range(3)], [7, 300_001, 2 << 20]]
    for pieces in splits:
        assert compress(data, method, level, pieces) == whole
    if method == "gzip":
        assert whole[:10] == GZIP_HEADER  # no name, mtime 0, OS 255
        assert gzip.decompress(whole) == data
    else:
        assert unzstd(whole) == data


def test_a_zstd_blob_is_a_frame_per_2_mib_piece_of_its_tar() -> None:
    """Each frame inflates alone (a worker made it alone), to its piece of the tar."""
    import zstandard

    data = sample(5 << 20)
    rest = compress(data, "zstd", 3, [1 << 20])
    pieces = []
    while rest:
        frame = zstandard.ZstdDecompressor().decompressobj()
        pieces.append(frame.decompress(rest))
        assert frame.eof
        rest = frame.unused_data
    assert [len(piece) for piece in pieces] == [2 << 20, 2 << 20, 1 << 20]
    assert b"".join(pieces) == data
    empty = zstandard.ZstdDecompressor().decompressobj()
    assert empty.decompress(compress(b"", "zstd", 3, [])) == b""
    assert empty.eof and not empty.unused_data  # one empty frame, which `zstd -d` takes


@pytest.mark.parametrize(("method", "piece"), [("gzip", 1 << 20), ("zstd", 2 << 20)])
def test_a_piece_compresses_alike_wherever_it_is_in_the_tar(method: str, piece: int) -> None:
    """Pieces are compressed apart (what lets workers share them out): a piece's
    bytes in the blob are those of the piece compressed alone."""
    first, second = sample(2 * piece)[:piece], sample(3 * piece)[2 * piece :]
    alone = compress(second, method, None, [])
    together = compress(first + second, method, None, [])
    if method == "gzip":  # without the header, the final block and the trailer
        alone, together = alone[10:-10], together[:-10]
    assert together.endswith(alone) and len(together) > len(alone)


def test_the_workers_run_at_the_builds_priority_not_the_writing_threads() -> None:
    """The pipelines' writing thread hands the pieces over at a lower priority
    (fastpath); the workers, which do most of a compressed build's work, must
    not inherit it."""
    from guix_image.fastpath.blocks import lower_priority

    def priority(thread_id: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, thread_id)

    with choose("zstd").compressors() as workers:

        def hand_over() -> None:
            lower_priority()
            stream = workers.stream()
            stream.compress(sample(1000))
            stream.flush()

        writer = threading.Thread(target=hand_over)
        writer.start()
        writer.join()
        names = ("guix-image-compress",)
        ids = [cast(int, t.native_id) for t in threading.enumerate() if t.name.startswith(names)]
        assert len(ids) == workers.depth - 1  # one per worker
        assert {priority(i) for i in ids} == {priority(threading.get_native_id())}


def test_zstd_blobs_do_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    data = sample(9 << 20)
    blobs = set()
    for workers in (1, 2, 4):
        monkeypatch.setattr(compression_module, "_worker_count", lambda w=workers: w)
        blobs.add(compress(data, "zstd", 3, [3 << 20]))
    assert len(blobs) == 1


def test_levels_and_labels() -> None:
    assert choose("gzip").level == 2 and choose("zstd").level == 3
    assert "ISA-L" in choose("gzip", 3).label and "zlib" in choose("gzip", 4).label
    assert choose("zstd", 19).label.startswith("zstd level 19 (libzstd ")
    assert choose("none").media_type == "application/vnd.oci.image.layer.v1.tar"
    for method, level in [("gzip", 0), ("gzip", 10), ("zstd", 20), ("none", 1), ("lz4", None)]:
        with pytest.raises(InputError):
            choose(method, level)


# -- builds ----------------------------------------------------------------------------


def oci_build(
    document: dict[str, Any],
    target: Path,
    kind: str = "oci-archive",
    method: str = "gzip",
    level: int | None = None,
    cache: LayerCache | None = None,
) -> BuildResult:
    config = validate_config(document)
    blobs = cache.blobs if cache is not None else None
    if kind == "oci-dir":
        output = OciOutput(kind, str(target), choose(method, level), kept_blobs=blobs)
        return build_image(config, output, cache=cache)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        output = OciOutput(kind, fd, choose(method, level), kept_blobs=blobs, mtime=config.mtime)
        return build_image(config, output, cache=cache)
    finally:
        os.close(fd)


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def blob(files: dict[str, bytes], digest: str) -> bytes:
    return files["blobs/sha256/" + digest.removeprefix("sha256:")]


def manifest_of(files: dict[str, bytes]) -> dict[str, Any]:
    index = json.loads(files["index.json"])
    return json.loads(blob(files, index["manifests"][0]["digest"]))  # type: ignore[no-any-return]


def warn(message: str) -> None:
    raise AssertionError(f"unexpected cache warning: {message}")


def test_an_oci_archive_is_a_layout_whose_digests_hold(store: StoreTree, tmp_path: Path) -> None:
    """Both digests from one pass: the config keeps the tars' diff_ids, the
    manifest the blobs', with media type, size and the compressor's annotation."""
    paths = populate(store)
    document = store.config([paths[:1], paths[1:]], repo_tag="app:1.0")
    for method in ("none", "gzip", "zstd"):
        archive = tmp_path / f"{method}.tar"
        result = oci_build(document, archive, method=method)
        files = members(archive)
        assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(files["index.json"])
        descriptor = index["manifests"][0]
        assert descriptor["annotations"] == {"org.opencontainers.image.ref.name": "app:1.0"}
        assert descriptor["digest"] == result.manifest_digest
        manifest = manifest_of(files)
        config = json.loads(blob(files, manifest["config"]["digest"]))
        assert manifest["config"]["digest"] == result.image_id
        for layer, diff_id, built in zip(
            manifest["layers"], config["rootfs"]["diff_ids"], result.layers, strict=True
        ):
            data = blob(files, layer["digest"])
            assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
            assert layer["size"] == len(data)
            assert layer["mediaType"] == choose(method).media_type
            tar = {"none": lambda b: b, "gzip": gzip.decompress, "zstd": unzstd}[method](data)
            assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id == built.diff_id
            if method == "none":
                assert "annotations" not in layer
            else:
                assert layer["annotations"][ANNOTATION] == choose(method).label
        # Docker's manifest.json beside the index, but for zstd, which Docker < 23 cannot read.
        assert ("manifest.json" in files) == (method != "zstd")


def unzstd(data: bytes) -> bytes:
    """All of a zstd stream's frames, inflated."""
    import zstandard

    inflate = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    return inflate.decompress(data)  # type: ignore[no-any-return]


def test_a_compressor_failure_fails_the_build_cleanly(
    store: StoreTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One clear error, nothing written, and no worker left behind (a thread
    alive would keep the next pipeline from forking)."""
    paths = [*populate(store), store.item("big", {"data": sample(3 << 20)})]
    document = store.config([paths])
    make = compression_module._piece_compressor

    def failing(compression: Compression) -> Any:
        compress = make(compression)
        pieces = iter(range(1000))

        def piece(data: memoryview) -> bytes:
            if next(pieces) == 1:
                raise MemoryError("out of memory")
            return compress(data)

        return piece

    monkeypatch.setattr(compression_module, "_piece_compressor", failing)
    target = tmp_path / "o.tar"
    with pytest.raises(OperationError, match="cannot compress a layer: out of memory"):
        oci_build(document, target, method="zstd")
    assert target.stat().st_size == 0
    assert only_thread()
    monkeypatch.setattr(compression_module, "_piece_compressor", make)
    oci_build(document, target, method="gzip")
    assert only_thread()  # the workers stop once the layers are made


def test_builds_are_byte_identical_cold_warm_and_across_thread_counts(
    store: StoreTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And a warm build compresses nothing: the blobs come from the cache."""
    paths = populate(store)
    store.item("big", {"data": sample(3 << 20), "more": os.urandom(300_000)})
    document = store.config([paths[:1], [*paths[1:], store.path("big")]])
    for method in ("gzip", "zstd"):
        cache = LayerCache(tmp_path / f"cache-{method}", warn)
        monkeypatch.setattr(compression_module, "_worker_count", lambda: 1)
        cold = tmp_path / f"cold-{method}.tar"
        oci_build(document, cold, method=method, cache=cache)
        monkeypatch.setattr(compression_module, "_worker_count", lambda: 3)
        uncached = tmp_path / f"uncached-{method}.tar"
        oci_build(document, uncached, method=method)

        def no_compression(self: object) -> None:
            raise AssertionError("a warm build compressed a layer")

        with monkeypatch.context() as patched:
            patched.setattr(compression_module.Compression, "compressors", no_compression)
            warm = tmp_path / f"warm-{method}.tar"
            oci_build(document, warm, method=method, cache=LayerCache(cache.directory.parent, warn))
        assert cold.read_bytes() == uncached.read_bytes() == warm.read_bytes()


def test_system_gzip_and_zstd_inflate_the_layers_to_the_uncompressed_tars(
    store: StoreTree, tmp_path: Path
) -> None:
    paths = [*populate(store), store.item("big", {"data": sample(5 << 20)})]  # zstd: 3 frames
    document = store.config([paths[:1], paths[1:]])
    tars = {}
    for method in ("none", "gzip", "zstd"):
        oci_build(document, tmp_path / f"{method}.tar", method=method)
        files = members(tmp_path / f"{method}.tar")
        tars[method] = [blob(files, layer["digest"]) for layer in manifest_of(files)["layers"]]
    for method, tool in (("gzip", "gzip"), ("zstd", "zstd")):
        require(tool)
        for data, tar in zip(tars[method], tars["none"], strict=True):
            out = subprocess.run([tool, "-d", "-c"], input=data, capture_output=True, check=True)
            assert out.stdout == tar


def test_a_kept_blob_that_was_damaged_is_made_again(store: StoreTree, tmp_path: Path) -> None:
    paths = populate(store)
    document = store.config([paths])
    cache = LayerCache(tmp_path / "cache", warn)
    first = oci_build(document, tmp_path / "a.tar", cache=cache)
    assert first.layers[0].blob is not None
    kept = Path(cache.blobs.path(first.layers[0].blob.digest))
    kept.write_bytes(b"x" * kept.stat().st_size)  # same size, other bytes
    # Into an archive: the copy finds it out, removes it, and the build fails once,
    # as for a stale cache entry (into a file, the CLI builds again; see test_cache).
    with pytest.raises(StaleCacheEntry, match="not the blob"):
        oci_build(document, tmp_path / "b.tar", cache=LayerCache(tmp_path / "cache", warn))
    assert not kept.exists()
    oci_build(document, tmp_path / "b.tar", cache=LayerCache(tmp_path / "cache", warn))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert kept.read_bytes() == blob(members(tmp_path / "a.tar"), first.layers[0].blob.digest)
    # Into a layout: found out before it is linked there, and made again at once.
    kept.write_bytes(b"y" * kept.stat().st_size)
    oci_build(document, tmp_path / "layout", "oci-dir", cache=LayerCache(tmp_path / "cache", warn))
    linked = tmp_path / "layout" / "blobs" / "sha256" / kept.name
    assert hashlib.sha256(linked.read_bytes()).hexdigest() == kept.name


def test_a_layout_gains_images_and_keeps_the_others(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    paths = populate(store)
    layout = tmp_path / "layout"
    one = oci_build(store.config([paths[:1]], repo_tag="a:1"), layout, "oci-dir")
    two = oci_build(store.config([paths], repo_tag="b:1"), layout, "oci-dir", method="zstd")
    again = oci_build(store.config([paths[1:]], repo_tag="a:1"), layout, "oci-dir")
    index = json.loads((layout / "index.json").read_text())
    names = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }
    assert names == {"b:1": two.manifest_digest, "a:1": again.manifest_digest}
    assert one.manifest_digest != again.manifest_digest
    verified = cli("verify", f"oci:{layout}:b:1", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["ok"] is True
    leftovers = [p for p in (layout / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_failed_build_leaves_no_layout_and_a_directory_is_refused(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    paths = populate(store)
    fifo = paths[0] / "deep" / "fifo"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([paths])))
    layout = tmp_path / "new-layout"
    failed = cli("build", str(config), "--format", "oci-dir", "-o", str(layout))
    assert failed.exit_code == 2  # a fifo is refused by name, found as the layer streams
    assert "fifo" in failed.stderr
    assert not layout.exists()
    # A failure in a layout that holds images leaves its index.json as it was.
    good = cli("build", "--example", "--format", "oci-dir", "-o", str(layout))
    assert good.exit_code == 0, good.output
    index = (layout / "index.json").read_bytes()
    again = cli("build", str(config), "--format", "oci-dir", "-o", str(layout))
    assert again.exit_code == 2
    assert (layout / "index.json").read_bytes() == index
    assert cli("verify", str(layout)).exit_code == 0
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    refused = cli("build", "--example", "--format", "oci-dir", "-o", str(occupied))
    assert refused.exit_code == 2
    assert "not an OCI layout" in refused.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]


def test_options_out_of_place_are_usage_errors(cli: Cli, tmp_path: Path) -> None:
    out = str(tmp_path / "x.tar")
    for args, message in [
        (["--compress", "gzip"], "--compress goes with --format oci-archive"),
        (["--format", "oci-archive", "--compress-level", "12"], "gzip levels are 1 to 9"),
        (
            ["--format", "oci-archive", "--compress", "none", "--compress-level", "3"],
            "gzip or zstd",
        ),
    ]:
        result = cli("build", "--example", "-o", out, *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr
    no_dir = cli("build", "--example", "--format", "oci-dir")
    assert no_dir.exit_code == 2 and "-o DIR" in no_dir.stderr
    assert not Path(out).exists()


def test_a_base_images_compressed_layers_stay_as_they_are(store: StoreTree, tmp_path: Path) -> None:
    """Same blob, same digest; an uncompressed base layer is compressed as ours are."""
    paths = populate(store)
    base = tmp_path / "base.tar"
    base_result = oci_build(store.config([paths[:1]]), base, method="zstd")
    assert base_result.layers[0].blob is not None
    app = store.item("app-on-base", {"f": "on top"})
    image = tmp_path / "image.tar"
    result = oci_build(store.config([[app]], from_image=str(base)), image, method="gzip")
    files = members(image)
    layers = manifest_of(files)["layers"]
    assert layers[0]["digest"] == base_result.layers[0].blob.digest
    assert layers[0]["mediaType"].endswith("+zstd")  # and what compressed it, carried over
    assert layers[0]["annotations"][ANNOTATION] == choose("zstd").label
    assert layers[1]["mediaType"].endswith("+gzip")
    assert [layer.diff_id for layer in result.layers][:1] == [base_result.layers[0].diff_id]


def test_oci_output_for_store_items_through_the_cli(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    busybox = busybox_store(store)
    database = make_database(tmp_path / "db.sqlite", {busybox: nar_hash(busybox)}, {})
    out = tmp_path / "items.tar"
    flags = ["--db", str(database), "--entrypoint", "/bin/busybox", "-S", "/bin=bin"]
    result = cli(
        "build",
        str(busybox),
        *flags,
        "--format",
        "oci-archive",
        "--compress",
        "zstd",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "manifest sha256:" in result.stderr
    assert cli("verify", str(out)).exit_code == 0
    shown = inspect_json(cli, out)
    assert {layer["compressed_by"] for layer in shown["layers"]} == {choose("zstd").label}
    assert {layer["compression"] for layer in shown["layers"]} == {"zstd"}


# -- real tools --------------------------------------------------------------------------


@pytest.fixture
def built(store: StoreTree, tmp_path: Path, cli: Cli) -> dict[str, Any]:
    """One config built as a docker-archive, a zstd oci-archive, a gzip oci-dir
    (Debian's umoci reads no zstd, nor does a docker-archive hold it). A big
    file makes a blob of several zstd frames."""
    paths = [*populate(store), store.item("big", {"data": sample(5 << 20)})]
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([paths[:1], paths[1:]], repo_tag="test/oci:1")))
    outputs = {
        "docker": (tmp_path / "d.tar", []),
        "archive": (tmp_path / "o.tar", ["--format", "oci-archive", "--compress", "zstd"]),
        "layout": (tmp_path / "layout", ["--format", "oci-dir"]),
    }
    for target, flags in outputs.values():
        result = cli("build", str(config), "-o", str(target), *flags)
        assert result.exit_code == 0, result.output
    return {"paths": paths, **{name: target for name, (target, _) in outputs.items()}}


def test_skopeo_reads_and_copies_both_forms(built: dict[str, Any], tmp_path: Path) -> None:
    require("skopeo")
    diff_ids = json.loads(
        run("skopeo", "inspect", "--config", f"docker-archive:{built['docker']}").stdout
    )["rootfs"]["diff_ids"]
    for reference in (
        f"oci-archive:{built['archive']}:test/oci:1",
        f"oci:{built['layout']}:test/oci:1",
    ):
        config = json.loads(run("skopeo", "inspect", "--config", reference).stdout)
        assert config["rootfs"]["diff_ids"] == diff_ids
        raw = json.loads(run("skopeo", "inspect", "--raw", reference).stdout)
        assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        copied = tmp_path / f"copy-{uuid.uuid4().hex[:6]}"
        run("skopeo", "copy", "-q", reference, f"oci:{copied}:t")  # skopeo checks every digest
        if reference.startswith("oci:"):  # gzip: a docker-archive cannot hold zstd layers
            run("skopeo", "copy", "-q", reference, f"docker-archive:{copied}.tar:x/y:1")


def test_umoci_unpacks_the_layout_as_the_docker_archive(
    built: dict[str, Any], tmp_path: Path
) -> None:
    rootfs = unpack(tmp_path, built["layout"], "test/oci:1")
    assert rootfs_tree(rootfs, built["paths"]) == disk_tree(built["paths"])


def test_podman_loads_the_oci_archive(built: dict[str, Any], podman_storage: Path) -> None:
    podman(podman_storage, "load", "-i", str(built["archive"]))
    inspected = json.loads(podman(podman_storage, "image", "inspect", "test/oci:1").stdout)
    docker_archive = members(built["docker"])
    config_name = json.loads(docker_archive["manifest.json"])[0]["Config"]
    diff_ids = json.loads(docker_archive[config_name])["rootfs"]["diff_ids"]
    assert inspected[0]["RootFS"]["Layers"] == diff_ids


def test_docker_runs_the_store_item_image_after_skopeo_copy(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    require("skopeo")
    if not docker_answers():
        pytest.skip("no Docker daemon answers `docker info`")
    busybox = busybox_store(store)
    database = make_database(tmp_path / "db.sqlite", {busybox: nar_hash(busybox)}, {})
    tag = f"guix-image-test/oci-{uuid.uuid4().hex[:8]}:1"
    archive = tmp_path / "items.tar"
    flags = ["--db", str(database), "-t", tag, "-S", "/bin=bin", "--entrypoint", "/bin/busybox"]
    result = cli("build", str(busybox), *flags, "--format", "oci-archive", "-o", str(archive))
    assert result.exit_code == 0, result.output
    converted = tmp_path / "converted.tar"
    run("skopeo", "copy", "-q", f"oci-archive:{archive}:{tag}", f"docker-archive:{converted}:{tag}")
    try:
        run("docker", "load", "-i", str(converted))
        shown = run("docker", "run", "--rm", "--network", "none", tag, "echo", "from oci")
        assert shown.stdout == "from oci\n"
        # Our own manifest.json lets docker load the oci-archive itself, too.
        run("docker", "rmi", "-f", tag)
        run("docker", "load", "-i", str(archive))
        assert (
            run("docker", "run", "--rm", "--network", "none", tag, "echo", "again").stdout
            == "again\n"
        )
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_verify_rebuilds_as_the_image_was_compressed_and_explains_a_difference(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    paths = populate(store)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([paths[:1], paths[1:]])))
    made = {}
    for name, flags in [("level3", ["--compress-level", "3"]), ("zstd", ["--compress", "zstd"])]:
        made[name] = tmp_path / f"{name}.tar"
        built = cli("build", str(config), "--format", "oci-archive", *flags, "-o", str(made[name]))
        assert built.exit_code == 0, built.output
        verified = cli("verify", str(made[name]), "--rebuild", str(config), "--json")
        assert verified.exit_code == 0, verified.output
        checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
        assert checks["rebuild layer 2 blob"]["ok"] is True
    other = tmp_path / "level5.tar"
    assert (
        cli(
            "build",
            str(config),
            "--format",
            "oci-archive",
            "--compress-level",
            "5",
            "-o",
            str(other),
        ).exit_code
        == 0
    )
    against = cli("verify", str(made["level3"]), "--against", str(other), "--json")
    assert against.exit_code == 1
    checks = {c["name"]: c for c in json.loads(against.stdout)["checks"]}
    assert checks["against layer 2"]["ok"] is True  # the same tar
    blob = checks["against layer 2 blob"]
    assert blob["ok"] is False
    assert "the same tar, compressed otherwise: by gzip level 5 (zlib" in blob["actual"]
    assert "by gzip level 3 (ISA-L igzip" in blob["actual"]


def test_one_index_of_an_image_per_platform(tmp_path: Path, cli: Cli) -> None:
    """The example's amd64 and arm64 images in one index, which skopeo copies
    whole (--all, checking every digest); each image is the one built alone."""
    multi = tmp_path / "multi.tar"
    platforms = ["--platform-image", "amd64", "--platform-image", "arm64"]
    built = cli("build", "--example", *platforms, "--format", "oci-archive", "-o", str(multi))
    assert built.exit_code == 0, built.output
    assert "Done: index sha256:" in built.stderr
    alone = tmp_path / "alone.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(alone)).exit_code == 0
    files = members(multi)
    top = json.loads(files["index.json"])["manifests"]
    assert [m["mediaType"] for m in top] == ["application/vnd.oci.image.index.v1+json"]
    index = json.loads(blob(files, top[0]["digest"]))
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]
    alone_manifest = json.loads(members(alone)["index.json"])["manifests"][0]["digest"]
    assert index["manifests"][0]["digest"] == alone_manifest
    assert "manifest.json" not in files  # docker load could not choose
    arm = cli("inspect", str(multi), "--platform", "linux/arm64", "--json")
    assert arm.exit_code == 0, arm.output
    assert json.loads(arm.stdout)["architecture"] == "arm64"
    assert cli("verify", str(multi), "--platform", "linux/amd64").exit_code == 0
    require("skopeo")
    raw = json.loads(run("skopeo", "inspect", "--raw", f"oci-archive:{multi}").stdout)
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    run("skopeo", "copy", "-q", "--all", f"oci-archive:{multi}", f"oci:{tmp_path / 'copy'}:x")
    copied = json.loads((tmp_path / "copy" / "index.json").read_text())["manifests"][0]
    assert copied["digest"] == top[0]["digest"]  # the same index, byte for byte


def test_platform_images_that_cannot_be_one_index(
    store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    paths = populate(store)
    config = tmp_path / "amd.json"
    config.write_text(json.dumps(store.config([paths])))
    out = str(tmp_path / "m.tar")
    oci = ["--format", "oci-archive", "-o", out]
    for args, message in [
        (["--platform-image", f"arm64={config}", *oci], "builds for amd64, not arm64"),
        (
            ["--platform-image", f"amd64={config}", "--platform-image", f"amd64={config}", *oci],
            "two images for amd64",
        ),
        (["--platform-image", f"amd64={config}", "-o", out], "needs --format oci-archive"),
        (["--platform-image", "amd64", *oci], "is not ARCH=CONFIG"),
    ]:
        result = cli("build", *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr
    assert not Path(out).exists()


def test_kept_blobs_are_trimmed_least_recently_used_first_but_not_a_builds_own(
    store: StoreTree, tmp_path: Path
) -> None:
    paths = populate(store)
    cache = LayerCache(tmp_path / "cache", warn)
    old = oci_build(store.config([paths[:1]]), tmp_path / "old.tar", cache=cache)
    old_blobs = [layer.blob.digest for layer in old.layers if layer.blob is not None]
    for digest in old_blobs:  # used long ago
        os.utime(cache.blobs.path(digest), (1, 1))
    crashed = Path(cache.blobs.directory) / ".new-crashed"
    crashed.write_bytes(b"half")
    os.utime(crashed, (1, 1))
    fresh = LayerCache(tmp_path / "cache", warn)
    new = oci_build(store.config([paths[1:]]), tmp_path / "new.tar", cache=fresh)
    fresh.trim_blobs(budget=0)  # everything but what this build used must go
    left = {p.name for p in Path(cache.blobs.directory).iterdir()}
    used = {layer.blob.digest.removeprefix("sha256:") for layer in new.layers if layer.blob}
    used |= {
        new.image_id.removeprefix("sha256:"),
        (new.manifest_digest or "").removeprefix("sha256:"),
    }
    assert left == used


def test_builds_into_one_layout_at_once_keep_each_others_images(
    store: StoreTree, tmp_path: Path
) -> None:
    """Eight processes, each adding an image under its own tag: all eight listed."""
    paths = populate(store)
    layout = tmp_path / "shared"
    configs = []
    for n in range(8):
        config = tmp_path / f"c{n}.json"
        config.write_text(json.dumps(store.config([paths], repo_tag=f"app:{n}")))
        configs.append(config)
    import sys

    command = [sys.executable, "-m", "guix_image", "build", "--format", "oci-dir", "-q"]
    processes = [
        subprocess.Popen(
            [*command, str(c), "-o", str(layout), "--no-cache"], stderr=subprocess.PIPE
        )
        for c in configs
    ]
    for process in processes:
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors
    index = json.loads((layout / "index.json").read_text())
    names = sorted(
        m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
    )
    assert names == [f"app:{n}" for n in range(8)]
