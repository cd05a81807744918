"""Every archive form the readers take, cross-checked with real tools: Docker archives
(`docker save`, Docker 25+, podman, several images, compressed), OCI layouts and
archives, standard input and pipes."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from guix_image.build.engine import BuildResult
from guix_image.errors import InputError
from guix_image.formats.images import select_image
from guix_image.formats.stored_layer import StoredLayer
from guix_image.model import Image

from .support.archives import archive_of, header, layer_members, layer_tar, read_archive
from .support.cli import Cli, inspect_json
from .support.stores import BuildFn, StoreTree
from .support.tools import GUIX_IMAGE, convert, docker_answers, podman, require

FORMS = ["docker-archive", "oci", "oci-archive", "oci-gzip", "oci-zstd", "docker-archive-gzip"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_and_verifies_with_the_same_diff_ids(
    image: tuple[Path, BuildResult], form: str, tmp_path: Path, cli: Cli
) -> None:
    archive, result = image
    target = convert(archive, form, tmp_path)
    summary = inspect_json(cli, target)
    expected = [layer.diff_id for layer in result.layers]
    assert [layer["diff_id"] for layer in summary["layers"]] == expected
    assert [layer["index"] for layer in summary["layers"]] == [1, 2]
    ours = inspect_json(cli, archive)
    assert [layer["entries"] for layer in summary["layers"]] == [
        layer["entries"] for layer in ours["layers"]
    ]
    assert summary["config"]["Cmd"] == ["/bin/app"]
    compression = {"oci-zstd": "zstd", "oci-gzip": "gzip", "oci": "gzip", "oci-archive": "gzip"}
    assert {layer["compression"] for layer in summary["layers"]} == {compression.get(form, "none")}
    verified = cli("verify", target, "--json")
    assert verified.exit_code == 0, verified.stdout
    assert json.loads(verified.stdout)["ok"] is True
    # skopeo's own view of the same archive
    transport = {
        "docker-archive": "docker-archive",
        "docker-archive-gzip": "docker-archive",
        "oci-archive": "oci-archive",
    }
    reference = f"{transport.get(form, 'oci')}:{target}" + (
        "" if form.startswith("docker") else ":t"
    )
    config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", reference], capture_output=True, check=True
        ).stdout
    )
    assert config["rootfs"]["diff_ids"] == [layer["diff_id"] for layer in summary["layers"]]


@pytest.mark.parametrize("form", ["docker-archive", "oci-archive", "docker-archive-gzip"])
def test_standard_input_is_read_in_one_pass(
    image: tuple[Path, BuildResult], form: str, tmp_path: Path, cli: Cli
) -> None:
    archive, _ = image
    target = Path(convert(archive, form, tmp_path))
    data = target.read_bytes()
    from_stdin = inspect_json(cli, "-", input=data)
    from_file = inspect_json(cli, target)
    assert from_stdin == from_file
    assert cli("verify", "-", input=data).exit_code == 0
    listing = inspect_json(cli, "-", "--files", "2", input=data)["listing"]
    assert any(
        entry["path"].endswith("/bin/link") and entry["linkname"] == "app" for entry in listing
    )


@pytest.mark.parametrize("form", ["docker-archive", "oci-archive"])
def test_podman_save_archives(
    image: tuple[Path, BuildResult], form: str, podman_storage: Path, cli: Cli
) -> None:
    archive, result = image
    podman(podman_storage, "load", "-q", "-i", str(archive))
    saved = podman_storage / "saved.tar"
    podman(podman_storage, "save", "-q", "--format", form, "-o", str(saved), "test/image:latest")
    summary = inspect_json(cli, saved)
    assert summary["repo_tags"] == ["localhost/test/image:latest"]
    assert [layer["diff_id"] for layer in summary["layers"]] == [
        layer.diff_id for layer in result.layers
    ]
    assert cli("verify", str(saved)).exit_code == 0


@pytest.mark.skipif(not docker_answers(), reason="no Docker daemon answers `docker info`")
def test_docker_save_archive(image: tuple[Path, BuildResult], tmp_path: Path, cli: Cli) -> None:
    archive, result = image
    tag = "guix-image-test/save:" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]
    subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True)
    try:
        subprocess.run(["docker", "tag", "test/image:latest", tag], check=True, capture_output=True)
        saved = tmp_path / "saved.tar"
        subprocess.run(["docker", "save", "-o", str(saved), tag], check=True, capture_output=True)
        summary = inspect_json(cli, saved)
        assert tag in summary["repo_tags"]
        assert [layer["diff_id"] for layer in summary["layers"]] == [
            layer.diff_id for layer in result.layers
        ]
        assert cli("verify", str(saved)).exit_code == 0
    finally:
        subprocess.run(["docker", "rmi", "-f", tag, "test/image:latest"], capture_output=True)


def docker25_archive(
    oci_dir: Path, target: Path, tags: tuple[str, ...] = ("docker25:latest",)
) -> None:
    """What `docker save` writes since Docker 25: an OCI layout plus a manifest.json,
    and (as moby's image exporter does) an index.json entry per tag, each naming the
    same manifest."""
    index = json.loads((oci_dir / "index.json").read_text())
    descriptor = index["manifests"][0]
    manifest_digest = descriptor["digest"].split(":")[1]
    manifest = json.loads((oci_dir / "blobs" / "sha256" / manifest_digest).read_bytes())
    legacy = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"].split(":")[1],
            "RepoTags": list(tags),
            "Layers": [
                "blobs/sha256/" + layer["digest"].split(":")[1] for layer in manifest["layers"]
            ],
        }
    ]
    (oci_dir / "manifest.json").write_text(json.dumps(legacy))
    index["manifests"] = [
        {
            **descriptor,
            "annotations": {
                "io.containerd.image.name": f"docker.io/library/{tag}",
                "org.opencontainers.image.ref.name": tag.rpartition(":")[2],
            },
        }
        for tag in tags
    ]
    (oci_dir / "index.json").write_text(json.dumps(index))
    with tarfile.open(target, "w") as tar:
        for path in sorted(oci_dir.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(oci_dir)), recursive=False)


def test_docker_25_archives(image: tuple[Path, BuildResult], tmp_path: Path, cli: Cli) -> None:
    archive, result = image
    layout = Path(convert(archive, "oci", tmp_path))
    target = tmp_path / "docker25.tar"
    docker25_archive(layout, target)
    summary = inspect_json(cli, target)
    assert summary["format"] == "docker-archive (Docker 25+ OCI layout)"
    assert "docker25:latest" in summary["repo_tags"]
    assert [layer["diff_id"] for layer in summary["layers"]] == [
        layer.diff_id for layer in result.layers
    ]
    assert cli("verify", str(target)).exit_code == 0


def test_a_docker_25_archive_of_two_tags_is_one_image(
    image: tuple[Path, BuildResult], tmp_path: Path, cli: Cli
) -> None:
    """`docker save app:1 app:alt` since Docker 25: index.json names one manifest
    twice; `docker load` loads one image with two tags, and so do we."""
    archive, result = image
    layout = Path(convert(archive, "oci", tmp_path))
    target = tmp_path / "docker25.tar"
    docker25_archive(layout, target, ("app:1", "app:alt"))
    summary = inspect_json(cli, target)  # one image: no --image needed
    assert {"docker.io/library/app:1", "docker.io/library/app:alt"} <= set(summary["repo_tags"])
    assert {"app:1", "app:alt"} <= set(summary["repo_tags"])
    chosen = inspect_json(cli, target, "--image", "app:alt")
    assert chosen["config_digest"] == summary["config_digest"]
    assert [layer["diff_id"] for layer in summary["layers"]] == [
        layer.diff_id for layer in result.layers
    ]
    assert cli("verify", str(target)).exit_code == 0


COMPRESSORS = {"gzip": ["gzip", "-c"], "zstd": ["zstd", "-q", "-c"], "xz": ["xz", "-c"]}
COMPRESSORS["bzip2"] = ["bzip2", "-c"]


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_a_compressed_archive_is_read_from_a_file_and_from_standard_input(
    image: tuple[Path, BuildResult], compression: str, tmp_path: Path, cli: Cli
) -> None:
    """What `guix pack -f docker` and nixpkgs write, and `docker save | gzip` makes:
    the whole archive compressed, as `docker load` reads it."""
    command = COMPRESSORS[compression]
    require(command[0])
    archive, result = image
    packed = tmp_path / f"image.tar.{compression}"
    with packed.open("wb") as out:
        subprocess.run([*command, str(archive)], stdout=out, check=True)
    expected = [layer.diff_id for layer in result.layers]
    for target, stdin in ((packed, None), ("-", packed.read_bytes())):
        summary = inspect_json(cli, target, input=stdin)
        assert summary["format"] == f"docker-archive, {compression}-compressed"
        assert summary["config_digest"] == result.image_id
        assert [layer["diff_id"] for layer in summary["layers"]] == expected
        verdict = cli("verify", str(target), "--json", input=stdin)
        assert verdict.exit_code == 0, verdict.output
    assert cli("diff-layers", str(archive), str(packed)).exit_code == 0


@pytest.mark.skipif(not docker_answers(), reason="no Docker daemon answers `docker info`")
def test_docker_loads_the_compressed_archive_we_read(
    image: tuple[Path, BuildResult], tmp_path: Path, cli: Cli
) -> None:
    archive, result = image
    packed = tmp_path / "image.tar.gz"
    with packed.open("wb") as out:
        subprocess.run(["gzip", "-c", str(archive)], stdout=out, check=True)
    loaded = subprocess.run(
        ["docker", "load", "-i", str(packed)], capture_output=True, text=True, check=True
    )
    name = loaded.stdout.strip().rsplit(" ", 1)[-1]
    try:
        docker_id = subprocess.run(
            ["docker", "image", "inspect", name, "--format", "{{.Id}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    finally:
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True)
    assert docker_id == inspect_json(cli, packed)["config_digest"] == result.image_id


def test_a_whole_archive_bomb_is_refused_from_a_file_and_from_a_pipe(
    tmp_path: Path, cli: Cli
) -> None:
    """A gzip of 2 GiB of zeros behind one member's header: refused at 200 times
    what was read, without inflating it all."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = header("big", size=2 << 30)
    bomb = deflate.compress(head)
    zeros = bytes(1 << 20)
    for _ in range(2048):
        bomb += deflate.compress(zeros)
    bomb += deflate.flush()
    (tmp_path / "bomb.tar.gz").write_bytes(bomb)
    for target, stdin in ((str(tmp_path / "bomb.tar.gz"), None), ("-", bomb)):
        result = cli("inspect", target, input=stdin)
        assert result.exit_code == 2, result.output
        assert "decompression bomb" in result.stderr


def test_what_is_not_an_archive_is_named(tmp_path: Path, cli: Cli) -> None:
    config = tmp_path / "app.json"
    config.write_text('{"architecture": "amd64"}')
    for target, stdin in ((str(config), None), ("-", config.read_bytes())):
        result = cli("inspect", target, input=stdin)
        assert result.exit_code == 2
        assert "is JSON, not an image archive (a build config? use `guix-image build`)" in (
            result.stderr
        )
    result = cli("inspect", "bbapp:1")
    assert result.exit_code == 2
    assert "bbapp:1 is not a file; for an image in Docker use `docker save bbapp:1 | " in (
        result.stderr
    )
    (tmp_path / "empty.tar").write_bytes(b"")
    result = cli("verify", str(tmp_path / "empty.tar"))
    assert result.exit_code == 2 and "is empty, not an image archive" in result.stderr


def multi_image_archive(first: Path, second: Path, target: Path) -> None:
    members: dict[str, bytes] = {}
    manifest = []
    for prefix, source in (("a", first), ("b", second)):
        with tarfile.open(source) as tar:
            [entry] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            for name in [entry["Config"], *entry["Layers"]]:
                members[f"{prefix}/{name}"] = tar.extractfile(name).read()  # type: ignore[union-attr]
            manifest.append(
                {
                    "Config": f"{prefix}/{entry['Config']}",
                    "RepoTags": [f"multi-{prefix}:1"],
                    "Layers": [f"{prefix}/{name}" for name in entry["Layers"]],
                }
            )
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(target, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_archives_with_several_images(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
    one, _ = build(store.config([[store.item("one", {"f": "1"})]]))
    two, _ = build(
        store.config([[store.item("two", {"f": "2"})], [store.item("three", {"g": "3"})]])
    )
    multi = tmp_path / "multi.tar"
    multi_image_archive(one, two, multi)
    ambiguous = cli("inspect", str(multi))
    assert ambiguous.exit_code == 2
    assert "holds 2 images; choose one with --image: 1 (multi-a:1" in ambiguous.stderr
    assert len(inspect_json(cli, multi, "--image", "2")["layers"]) == 2
    assert len(inspect_json(cli, multi, "--image", "multi-a:1")["layers"]) == 1
    assert len(inspect_json(cli, multi, "--image", "multi-b")["layers"]) == 2
    missing = cli("inspect", str(multi), "--image", "3")
    assert missing.exit_code == 2 and "there is no image 3" in missing.stderr


def test_image_names_match_by_repository_not_by_host() -> None:
    def image(tag: str) -> Image[StoredLayer]:
        return Image(
            format="docker-archive",
            repo_tags=[tag],
            config_location="c",
            config_bytes=b"{}",
            config={},
            layers=[],
        )

    images = [image("registry:5000/app:1.0"), image("registry:5000/other:2")]
    assert select_image(images, "registry:5000/other", "x") is images[1]
    assert select_image(images, "registry:5000/app", "x") is images[0]
    with pytest.raises(Exception, match="no image is named 'registry'"):
        select_image(images, "registry", "x")


def named(tag: str, digest: str, **config: str) -> Image[StoredLayer]:
    image: Image[StoredLayer] = Image(
        format="oci-archive",
        repo_tags=[tag] if tag else [],
        config_location="c",
        config_bytes=b"{}",
        config=config,
        layers=[],
    )
    image.config_digest = "sha256:" + digest * 64
    return image


def test_images_are_named_as_docker_names_them() -> None:
    """`app` is `app:latest`; docker.io/library/ and podman's localhost/ do not
    matter; an image ID or a unique prefix of one; an ambiguous name is refused
    with the candidates."""
    images = [
        named("docker.io/library/app:latest", "a"),
        named("localhost/tool:1", "b"),
        named("tool:2", "b" * 3 + "c"),
    ]
    assert select_image(images, "app", "x") is images[0]
    assert select_image(images, "docker.io/app:latest", "x") is images[0]
    assert select_image(images, "tool:1", "x") is images[1]
    assert select_image(images, "localhost/tool:2", "x") is images[2]
    assert select_image(images, "sha256:aaaa", "x") is images[0]
    assert select_image(images, "bbbc", "x") is images[2]
    with pytest.raises(InputError, match=r"'tool' names 2 images; choose one of 2 \(lo"):
        select_image(images, "tool", "x")
    with pytest.raises(InputError, match=r"'bbb' names|no image is named 'bbb'"):
        select_image(images, "bbb", "x")  # too short to be an ID, not a name either


def test_a_multi_platform_archive_lists_and_chooses_platforms() -> None:
    images = [
        named("app:1", "a", os="linux", architecture="amd64"),
        named("app:1", "b", os="linux", architecture="arm64", variant="v8"),
    ]
    with pytest.raises(
        InputError, match=r"choose one with --image or --platform: .*linux/arm64/v8"
    ):
        select_image(images, None, "x")
    assert select_image(images, None, "x", "linux/arm64") is images[1]
    assert select_image(images, "app:1", "x", "linux/amd64") is images[0]
    with pytest.raises(InputError, match="has no image for linux/s390x; it has 1 "):
        select_image(images, None, "x", "linux/s390x")


def test_skopeo_references_name_the_archive_and_the_image(
    image: tuple[Path, BuildResult], tmp_path: Path, cli: Cli
) -> None:
    """docker-archive:FILE[:name:tag], oci-archive:FILE[:tag], oci:DIR[:tag], as
    skopeo takes them; two images of one layout compared by naming each."""
    archive, result = image
    layout = Path(convert(archive, "oci", tmp_path))
    subprocess.run(
        ["skopeo", "copy", "-q", f"docker-archive:{archive}", f"oci:{layout}:second"],
        check=True,
        capture_output=True,
    )
    for reference in (f"oci:{layout}:t", f"oci:{layout}:second"):
        summary = inspect_json(cli, reference)
        assert [layer["diff_id"] for layer in summary["layers"]] == [
            layer.diff_id for layer in result.layers
        ]
    assert inspect_json(cli, f"docker-archive:{archive}:test/image:latest")["repo_tags"]
    assert cli("diff-layers", f"oci:{layout}:t", f"oci:{layout}:second").exit_code == 0
    clash = cli("inspect", f"oci:{layout}:t", "--image", "second")
    assert clash.exit_code == 2 and "names image 't', and --image 'second'" in clash.stderr


def test_build_from_a_compressed_oci_base(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli: Cli
) -> None:
    base, base_result = build(
        store.config([[store.item("base", {"etc/os": "x" * 10_000})]], repo_tag="b:1")
    )
    oci_base = convert(base, "oci-archive", tmp_path)
    image, _ = build(store.config([[store.item("top", {"t": "t"})]], from_image=oci_base))
    archive = read_archive(image)
    assert archive["config"]["rootfs"]["diff_ids"][0] == base_result.layers[0].diff_id
    assert layer_members(archive["layers"][0])[-1].name.endswith("etc/os")
    assert cli("verify", str(image)).exit_code == 0


def test_a_small_layer_that_starts_like_json_is_still_a_layer(tmp_path: Path, cli: Cli) -> None:
    layer = layer_tar([("[", b"coreutils ships one"), ("{x}", b"")])
    archive = archive_of([layer], tmp_path / "j.tar")
    from_file = json.loads(cli("inspect", str(archive), "--json").stdout)
    piped = cli("inspect", "-", "--json", input=archive.read_bytes())
    assert piped.exit_code == 0, piped.stderr
    assert json.loads(piped.stdout)["layers"] == from_file["layers"]


def test_a_fifo_or_process_substitution_is_read_as_a_stream(
    tmp_path: Path, image_file: Path
) -> None:
    result = subprocess.run(
        f"{shlex.join(GUIX_IMAGE)} inspect <(cat {shlex.quote(str(image_file))}) --json",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["repo_tags"] == ["test/image:latest"]


def test_malformed_env_and_history_in_an_archive_are_refused(tmp_path: Path, cli: Cli) -> None:
    layer = layer_tar([("f", b"1")])
    for bad in (
        {"config": {"Env": [1, 2]}},
        {"config": {"Env": "A=1"}},
        {"history": [{"comment": 5}]},
    ):
        archive = archive_of([layer], tmp_path / "bad.tar", **bad)
        result = cli("inspect", str(archive))
        assert result.exit_code == 2, (bad, result.output)
        assert result.stderr.count("\n") == 1


def test_an_outer_hard_link_to_a_later_member_is_refused(tmp_path: Path, cli: Cli) -> None:
    """`docker load` extracts the archive: a hard link to what comes later cannot be made."""
    import io

    layer = layer_tar([("f", b"1")])
    archive = archive_of([layer], tmp_path / "a.tar")
    with tarfile.open(archive) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]
    forward = tmp_path / "forward.tar"
    with tarfile.open(forward, "w") as tar:
        alias = tarfile.TarInfo("alias.tar")
        alias.type, alias.linkname = tarfile.LNKTYPE, "0/layer.tar"
        tar.addfile(alias)
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    result = cli("inspect", str(forward))
    assert result.exit_code == 2
    assert "hard link to '0/layer.tar', which does not come before it" in result.stderr


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_compressed_oci_archive_is_read_too(
    image: tuple[Path, BuildResult], compression: str, tmp_path: Path, cli: Cli
) -> None:
    command = COMPRESSORS[compression]
    require(command[0])
    archive, result = image
    oci = Path(convert(archive, "oci-archive", tmp_path))
    packed = tmp_path / f"oa.tar.{compression}"
    with packed.open("wb") as out:
        subprocess.run([*command, str(oci)], stdout=out, check=True)
    for target, stdin in ((packed, None), ("-", packed.read_bytes())):
        summary = inspect_json(cli, target, input=stdin)
        assert summary["format"] == f"oci-archive, {compression}-compressed"
        assert [layer["diff_id"] for layer in summary["layers"]] == [
            layer.diff_id for layer in result.layers
        ]
        assert cli("verify", str(target), input=stdin).exit_code == 0
