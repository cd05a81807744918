"""The build core: archive structure, layer contents, base images, customisation,
reproducibility, and faults during a build."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from guix_image.build.config import validate_config
from guix_image.build.engine import build_image
from guix_image.build.output import atomic_output
from guix_image.cli import main
from guix_image.errors import FileChanged, InputError, OperationError

from .support.archives import layer_members, read_archive
from .support.stores import CREATED, BuildFn, StoreTree, disk_tree, layer_tree, populate
from .support.tools import docker_answers, is_root

if TYPE_CHECKING:
    from click.testing import CliRunner


def test_layers_hold_exactly_the_store_paths(store: StoreTree, build: BuildFn) -> None:
    paths = populate(store)
    output, _ = build(store.config([[paths[0]], paths[1:]]))
    image = read_archive(output)
    ancestors = len(str(store.store_dir).strip("/").split("/"))
    assert layer_tree(image["layers"][0], ancestors) == disk_tree(paths[:1])
    assert layer_tree(image["layers"][1], ancestors) == disk_tree(paths[1:])


def test_every_entry_has_the_configured_owner_and_mtime(store: StoreTree, build: BuildFn) -> None:
    paths = populate(store)
    document = store.config(
        [paths], mtime="2001-02-03T04:05:06Z", uid=1000, gid=100, uname="u", gname="g"
    )
    output, _ = build(document)
    members = layer_members(read_archive(output)["layers"][0])
    assert members
    for member in members:
        assert (member.uid, member.gid, member.uname, member.gname) == (1000, 100, "u", "g")
        assert member.mtime == 981173106
        assert not {"mtime", "atime", "ctime"} & set(member.pax_headers)


def test_names_are_relative_and_start_with_store_dir_ancestors(
    store: StoreTree, build: BuildFn
) -> None:
    item = store.item("x", {"f": "1"})
    output, _ = build(store.config([[item]]))
    members = layer_members(read_archive(output)["layers"][0])
    parts = str(store.store_dir).strip("/").split("/")
    assert [m.name for m in members[: len(parts)]] == [
        "/".join(parts[: i + 1]) for i in range(len(parts))
    ]
    assert all(m.mode == 0o555 and m.isdir() for m in members[: len(parts)])
    assert not any(m.name.startswith("/") for m in members)


def test_hard_links_become_regular_files(store: StoreTree, build: BuildFn) -> None:
    item = store.item("h", {"a": "same content"})
    os.link(item / "a", item / "b")
    output, _ = build(store.config([[item]]))
    members = {
        m.name.rsplit("/", 1)[-1]: m for m in layer_members(read_archive(output)["layers"][0])
    }
    assert members["a"].isreg() and members["b"].isreg()
    assert members["b"].size == len("same content")


def test_archive_structure_and_digests(store: StoreTree, build: BuildFn) -> None:
    item = store.item("x", {"f": "1"})
    output, result = build(store.config([[item], [item]], config={"Cmd": ["/x"]}))
    with tarfile.open(output) as outer:
        names = outer.getnames()
        config_name = next(n for n in names if n.endswith(".json") and n != "manifest.json")
        raw_config = outer.extractfile(config_name).read()  # type: ignore[union-attr]
    assert names[-1] == "manifest.json"
    image = read_archive(output)
    [manifest] = image["manifest"]
    assert manifest["RepoTags"] == ["test/image:latest"]
    assert manifest["Config"] == hashlib.sha256(raw_config).hexdigest() + ".json"
    assert result.image_id == "sha256:" + hashlib.sha256(raw_config).hexdigest()
    assert result.bytes_written == output.stat().st_size
    assert all(name.endswith("/layer.tar") for name in manifest["Layers"])
    config = image["config"]
    assert config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(layer).hexdigest() for layer in image["layers"]
    ]
    assert [layer.diff_id for layer in result.layers] == config["rootfs"]["diff_ids"]
    assert len(config["history"]) == 2
    assert config["created"] == CREATED
    assert config["config"] == {"Cmd": ["/x"]}
    assert (config["architecture"], config["os"]) == ("amd64", "linux")


def test_same_inputs_give_the_same_bytes(store: StoreTree, build: BuildFn) -> None:
    paths = populate(store)
    document = store.config([paths[:1], paths[1:]])
    first, _ = build(document)
    second, _ = build(document)
    assert first.read_bytes() == second.read_bytes()


def test_times_on_disk_do_not_matter(store: StoreTree, build: BuildFn) -> None:
    paths = populate(store)
    document = store.config([paths])
    first, _ = build(document)
    for path in [paths[0], *paths[0].rglob("*")]:
        if not path.is_symlink():
            os.utime(path, (123456789, 987654321))  # atime, mtime; ctime changes too
    second, _ = build(document)
    assert first.read_bytes() == second.read_bytes()


def make_tree(root: Path, order: list[str]) -> None:
    item = root / "gnu/store/abc-order"
    item.mkdir(parents=True)
    for name in order:
        (item / name).write_text(name)


def test_directory_listing_order_does_not_matter(
    store: StoreTree, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = store.item("order", {f"file-{i:03d}": str(i) for i in range(200)})
    (item / "sub").mkdir()
    document = store.config([[item]])
    first, _ = build(document)
    real_listdir = os.listdir
    # Readdir order depends on the file system and its history; simulate the
    # opposite of what this one gives.
    monkeypatch.setattr(os, "listdir", lambda path: real_listdir(path)[::-1])
    second, _ = build(document)
    assert first.read_bytes() == second.read_bytes()


def build_as(uid: int, document: dict[str, Any], root: Path, output: Path) -> None:
    """Build in a child process running as `uid` (modules are already imported)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with atomic_output(str(output)) as fd:
                build_image(validate_config(document), fd, root=str(root))
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not is_root(), reason="needs root to switch users")
def test_the_user_running_the_build_does_not_matter() -> None:
    shared = Path(tempfile.mkdtemp(prefix="guix-image-user-test-"))
    try:
        shared.chmod(0o777)
        item = shared / "root/gnu/store/abc-item"
        (item / "bin").mkdir(parents=True)
        (item / "bin/tool").write_text("tool")
        (item / "doc").write_text("doc")
        for path in (
            shared / "root",
            shared / "root/gnu",
            shared / "root/gnu/store",
            item,
            item / "bin",
        ):
            path.chmod(0o755)
        document = {
            "architecture": "amd64",
            "created": CREATED,
            "repo_tag": "user:1",
            "store_dir": "/gnu/store",
            "store_layers": [["/gnu/store/abc-item"]],
        }
        build_as(0, document, shared / "root", shared / "as-root.tar")
        build_as(65534, document, shared / "root", shared / "as-nobody.tar")
        assert (shared / "as-nobody.tar").stat().st_uid == 65534
        assert (shared / "as-root.tar").read_bytes() == (shared / "as-nobody.tar").read_bytes()
    finally:
        shutil.rmtree(shared)


def test_base_image_layers_env_and_history_carry_over(store: StoreTree, build: BuildFn) -> None:
    base_item = store.item("base", {"etc/base": "b"})
    top_item = store.item("top", {"bin/top": "t"})
    base, _ = build(
        store.config(
            [[base_item]],
            config={"Env": ["PATH=/base", "KEEP=1"], "Cmd": ["/old"]},
            repo_tag="base:1",
        )
    )
    image, result = build(
        store.config([[top_item]], from_image=str(base), config={"Env": ["PATH=/top", "NEW=2"]})
    )
    base_archive, new_archive = read_archive(base), read_archive(image)
    assert new_archive["layers"][0] == base_archive["layers"][0]
    base_diff_ids = base_archive["config"]["rootfs"]["diff_ids"]
    assert new_archive["config"]["rootfs"]["diff_ids"][:1] == base_diff_ids
    assert new_archive["config"]["config"]["Env"] == ["PATH=/top", "KEEP=1", "NEW=2"]
    assert (
        "Cmd" not in new_archive["config"]["config"]
    )  # only Env is inherited, as the reference does
    history = new_archive["config"]["history"]
    assert history[0] == base_archive["config"]["history"][0]
    assert len(history) == 2
    assert len(result.layers) == 2


def test_base_image_that_is_not_an_archive_is_bad_input(
    store: StoreTree, build: BuildFn, tmp_path: Path
) -> None:
    item = store.item("x", {"f": "1"})
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"not a tar archive at all" * 40)
    with pytest.raises(InputError, match=r"^config field 'from_image': .*bogus.tar"):
        build(store.config([[item]], from_image=str(bogus)))
    with pytest.raises(InputError, match=r"'from_image': .*missing.tar: no such file"):
        build(store.config([[item]], from_image=str(tmp_path / "missing.tar")))


def customisation(tmp_path: Path, content: bytes, checksum: str | None = None) -> Path:
    directory = tmp_path / "customisation"
    directory.mkdir()
    (directory / "layer.tar").write_bytes(content)
    (directory / "checksum").write_text((checksum or hashlib.sha256(content).hexdigest()) + "\n")
    return directory


def small_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("etc/motd")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return buffer.getvalue()


def test_customisation_layer_comes_last(store: StoreTree, build: BuildFn, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1"})
    content = small_tar()
    output, _ = build(
        store.config([[item]], customisation_layer=str(customisation(tmp_path, content)))
    )
    image = read_archive(output)
    assert image["layers"][-1] == content
    assert (
        image["config"]["rootfs"]["diff_ids"][-1] == "sha256:" + hashlib.sha256(content).hexdigest()
    )


def test_customisation_checksum_mismatch_writes_nothing(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1"})
    directory = customisation(tmp_path, small_tar(), checksum="0" * 64)
    chunks: list[bytes] = []
    config = validate_config(store.config([[item]], customisation_layer=str(directory)))
    with pytest.raises(
        InputError, match=r"layer.tar has sha256 [0-9a-f]{64}, but its checksum file says 0{64}"
    ):
        build_image(config, lambda block: chunks.append(bytes(block)))
    assert chunks == []


def test_missing_store_path_fails_before_writing(store: StoreTree) -> None:
    item = store.item("x", {"f": "1"})
    chunks: list[bytes] = []
    config = validate_config(store.config([[item], [item, store.path("gone")]]))
    with pytest.raises(
        InputError, match=r"'store_layers'\[1\]\[1\]: store path .*-gone does not exist"
    ):
        build_image(config, lambda block: chunks.append(bytes(block)))
    assert chunks == []


class ChangeFileOnceSized:
    """A progress reporter that changes a file after the scan, before the copy."""

    def __init__(self, path: Path, content: bytes) -> None:
        self.path, self.content = path, content

    def layer_started(self, number: int, total: int, description: str) -> None:
        pass

    def layer_sized(self, size: int) -> None:
        self.path.write_bytes(self.content)

    def layer_progress(self, written: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@pytest.mark.parametrize(("content", "message"), [(b"much longer now", "grew"), (b"", "shrank")])
def test_a_file_changing_during_the_build_fails_and_leaves_nothing(
    store: StoreTree, tmp_path: Path, content: bytes, message: str
) -> None:
    item = store.item("x", {"f": "original"})
    output = tmp_path / "out.tar"
    config = validate_config(store.config([[item]]))
    with pytest.raises(FileChanged, match=rf"/f: file {message} while it was being read"):  # noqa: SIM117
        with atomic_output(str(output)) as fd:
            build_image(config, fd, progress=ChangeFileOnceSized(item / "f", content))
    assert os.listdir(tmp_path) == [store.base.name]


def test_unreadable_sink_error_is_an_operation_error(store: StoreTree) -> None:
    item = store.item("x", {"f": "1"})
    config = validate_config(store.config([[item]]))

    def broken(block: Any) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OperationError, match=r"cannot write the output: .*No space left on device"):
        build_image(config, broken)


def test_empty_layer_list_and_empty_layer(store: StoreTree, build: BuildFn) -> None:
    output, _ = build(store.config([[]]))
    members = layer_members(read_archive(output)["layers"][0])
    assert all(m.isdir() for m in members)
    output, _ = build(store.config([]))
    assert read_archive(output)["config"]["rootfs"]["diff_ids"] == []


# -- base images that do not match their digests, big layers, the example --------


def read_manifest_config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("manifest.json"))[0]  # type: ignore[arg-type, no-any-return]


def flip_layer_byte(archive: Path, target: Path) -> Path:
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = tar.getmember(read_manifest_config(archive)["Layers"][0])
    data[member.offset_data + member.size - 1100] ^= 1  # inside the end-of-archive zeros
    target.write_bytes(data)
    return target


def test_a_broken_base_image_is_bad_input(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli_runner: CliRunner
) -> None:
    base, _ = build(store.config([[store.item("b", {"f": "x" * 5000})]]))
    broken = flip_layer_byte(base, tmp_path / "broken.tar")
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(store.config([[store.item("t", {"g": "1"})]], from_image=str(broken)))
    )
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(tmp_path / "out.tar")])
    assert result.exit_code == 2
    assert "has digest sha256:" in result.stderr and "was expected" in result.stderr
    assert not (tmp_path / "out.tar").exists()


def test_layers_too_big_to_plan_are_walked_twice_with_the_same_bytes(
    store: StoreTree, build: BuildFn
) -> None:
    item = store.item("many", {f"f{i:03d}": str(i) * i for i in range(200)})
    document = store.config([[item], [item]])
    normal, _ = build(document)
    capped, _ = build(document, max_planned=10)
    assert normal.read_bytes() == capped.read_bytes()


def test_a_store_changing_between_the_two_walks_fails(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("many", {f"f{i:03d}": "x" for i in range(50)})

    class Grow:
        def layer_started(self, number: int, total: int, description: str) -> None:
            pass

        def layer_sized(self, size: int) -> None:
            (item / "zzz-new").write_text("after the first walk")

        def layer_progress(self, written: int) -> None:
            pass

        def message(self, text: str) -> None:
            pass

    output = tmp_path / "o.tar"
    with pytest.raises(FileChanged, match="changed during the build"):  # noqa: SIM117
        with atomic_output(str(output)) as fd:
            build_image(
                validate_config(store.config([[item]])), fd, progress=Grow(), max_planned=10
            )
    assert not output.exists()


def test_example_does_not_depend_on_the_umask(tmp_path: Path, cli_runner: CliRunner) -> None:
    outputs = []
    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            result = cli_runner.invoke(
                main, ["build", "--example", "-q", "-o", str(tmp_path / f"{mask}.tar")]
            )
        finally:
            os.umask(old)
        assert result.exit_code == 0
        outputs.append((tmp_path / f"{mask}.tar").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert read_archive(tmp_path / f"{0o022}.tar")["manifest"][0]["RepoTags"] == [
        "guix-image-example:latest"
    ]


# -- what loaders refuse, or would make a build hang, is bad input at the start ----------


def test_over_125_layers_are_refused_before_any_output(store: StoreTree, tmp_path: Path) -> None:
    items = [store.item(f"i{n}", {"f": str(n)}) for n in range(126)]
    chunks: list[bytes] = []
    config = validate_config(store.config([[item] for item in items]))
    with pytest.raises(InputError, match="would have 126 layers; `docker load` refuses more"):
        build_image(config, lambda block: chunks.append(bytes(block)))
    assert chunks == []


def test_a_config_over_4_mib_is_refused_before_any_output(store: StoreTree) -> None:
    item = store.item("x", {"f": "1"})
    labels = {f"label-{n}": "v" * 1000 for n in range(4200)}
    config = validate_config(store.config([[item]], config={"Labels": labels}))
    chunks: list[bytes] = []
    with pytest.raises(InputError, match=r"the image config would be .* loaders refuse more"):
        build_image(config, lambda block: chunks.append(bytes(block)))
    assert chunks == []


@pytest.mark.parametrize("which", ["layer.tar", "checksum"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_customisation_file_that_is_not_a_file_is_refused_at_once(
    which: str, kind: str, store: StoreTree, tmp_path: Path, cli_runner: Any
) -> None:
    directory = customisation(tmp_path, small_tar())
    (directory / which).unlink()
    if kind == "fifo":
        os.mkfifo(directory / which)
    else:
        (directory / which).symlink_to("/dev/zero")
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            store.config([[store.item("x", {"f": "1"})]], customisation_layer=str(directory))
        )
    )
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(tmp_path / "o.tar")])
    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "o.tar").exists()


def test_a_base_image_that_is_a_fifo_is_refused(
    store: StoreTree, tmp_path: Path, cli_runner: Any
) -> None:
    os.mkfifo(tmp_path / "base.tar")
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            store.config([[store.item("x", {"f": "1"})]], from_image=str(tmp_path / "base.tar"))
        )
    )
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(tmp_path / "o.tar")])
    assert result.exit_code == 2, result.output
    assert "neither a file nor an OCI layout directory" in result.stderr


def test_the_example_program_prints_its_greeting_with_nothing_else() -> None:
    """The example image's program needs no shell and no libc: run here (amd64), and
    read back by an independent disassembler for arm64 (capstone)."""
    import platform

    import capstone

    from guix_image.build.example import GREETING, hello_program

    amd64 = hello_program("amd64")
    if platform.machine() == "x86_64":
        with tempfile.TemporaryDirectory() as directory:
            program = Path(directory) / "hello"
            program.write_bytes(amd64)
            program.chmod(0o755)
            done = subprocess.run([str(program)], capture_output=True, timeout=10)
            assert (done.returncode, done.stdout) == (0, GREETING)
    arm64 = hello_program("arm64")
    assert arm64[18] == 183 and amd64[18] == 62  # e_machine: aarch64, x86-64
    disassembler = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    code = [(i.mnemonic, i.op_str) for i in disassembler.disasm(arm64[120:152], 0x400078)]
    assert code == [
        ("mov", "x0, #1"),
        ("adr", "x1, #0x400098"),  # the message, right after the code
        ("mov", f"x2, #{len(GREETING):#x}"),
        ("mov", "x8, #0x40"),  # write
        ("svc", "#0"),
        ("mov", "x0, #0"),
        ("mov", "x8, #0x5d"),  # exit
        ("svc", "#0"),
    ]
    assert arm64[152:] == GREETING


def test_docker_runs_the_example(tmp_path: Path, cli_runner: CliRunner) -> None:
    """The Quick start's image prints its greeting with `docker run`."""
    from guix_image.build.items import this_architecture

    if not docker_answers():
        pytest.skip("no Docker daemon answers `docker info`")
    if this_architecture() not in ("amd64", "arm64"):
        pytest.skip(f"the example has no program for {this_architecture()}")
    archive = tmp_path / "example.tar"
    assert cli_runner.invoke(main, ["build", "-q", "--example", "-o", str(archive)]).exit_code == 0
    subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True)
    try:
        ran = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "guix-image-example"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        subprocess.run(["docker", "rmi", "-f", "guix-image-example"], capture_output=True)
    assert (ran.returncode, ran.stdout) == (0, "Hello, world!\n"), ran.stderr
