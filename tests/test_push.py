"""`guix-image push`: into a real registry (Debian's docker-registry, started on a
loopback port), checked by skopeo and docker; what is uploaded is counted in the
registry's own access log."""

from __future__ import annotations

import base64
import json
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from guix_image.build.store_layer import StoreLayer
from guix_image.errors import InputError
from guix_image.formats import compression
from guix_image.registry.reference import parse_reference

from .support.cli import Cli, inspect_json
from .support.nar import nar_hash
from .support.registry import (
    FailingProxy,
    Registry,
    TokenService,
    free_port,
    running_registry,
)
from .support.stores import StoreTree, busybox_store, make_database, populate
from .support.tools import docker_answers, require, run


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    directory = tmp_path / "registry"
    directory.mkdir()
    with running_registry(directory) as started:
        yield started


def manifest_digest(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        return json.loads(member.read())["manifests"][0]["digest"]  # type: ignore[no-any-return]


def skopeo_digest(reference: str) -> str:
    require("skopeo")
    shown = run("skopeo", "inspect", "--tls-verify=false", f"docker://{reference}")
    return json.loads(shown.stdout)["Digest"]  # type: ignore[no-any-return]


def test_references_as_users_write_them() -> None:
    ref = parse_reference("docker://localhost:5000/team/app:1.0")
    assert (ref.host, ref.repository, ref.tag, ref.loopback) == (
        "localhost:5000",
        "team/app",
        "1.0",
        True,
    )
    digest = "sha256:" + "a" * 64
    pinned = parse_reference(f"registry.example/app@{digest}")
    assert (pinned.target, pinned.loopback, str(pinned)) == (
        digest,
        False,
        f"registry.example/app@{digest}",
    )
    assert str(parse_reference("127.0.0.1:5000/app")) == "127.0.0.1:5000/app:latest"
    for bad in [
        "app:1.0",
        "localhost:5000/App",
        "localhost:5000/app:bad tag",
        "host.x/app@sha256:12",
    ]:
        with pytest.raises(InputError):
            parse_reference(bad)


def test_push_then_again_uploads_nothing(registry: Registry, tmp_path: Path, cli: Cli) -> None:
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    ref = f"{registry.host}/guix/example:1"
    pushed = cli("push", str(archive), ref)
    assert pushed.exit_code == 0, pushed.output
    digest = manifest_digest(archive)
    assert pushed.stdout == f"{ref}@{digest}\n"  # the archive's own manifest, byte for byte
    assert skopeo_digest(ref) == digest
    first_uploads = registry.uploads()
    assert len(first_uploads) == 4  # config and three layers
    copied = tmp_path / "copied"
    run("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{copied}:x")
    again = cli("push", str(archive), ref, "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["uploaded"] == [] and len(report["present"]) == 4
    assert registry.uploads() == first_uploads  # the registry saw no new upload


def test_a_changed_item_uploads_its_layer_and_the_config(
    registry: Registry, store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    paths = populate(store)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([paths[:1], paths[1:]])))
    ref = f"{registry.host}/guix/items:1"
    assert cli("push", str(config), ref).exit_code == 0
    before = set(registry.uploads())
    (paths[0] / "new-file").write_text("changed\n")
    pushed = cli("push", str(config), ref, "--json")
    assert pushed.exit_code == 0, pushed.output
    report = json.loads(pushed.stdout)
    new = set(registry.uploads()) - before
    assert set(report["uploaded"]) == new and len(new) == 2  # the first layer and the config
    assert len(report["present"]) == 1  # the second layer
    assert skopeo_digest(ref) == report["digest"]


def test_mount_from_another_repository(registry: Registry, tmp_path: Path, cli: Cli) -> None:
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    assert cli("push", str(archive), f"{registry.host}/one/app:1").exit_code == 0
    uploads = registry.uploads()
    pushed = cli(
        "push", str(archive), f"{registry.host}/two/app:1", "--from-repo", "one/app", "--json"
    )
    assert pushed.exit_code == 0, pushed.output
    assert len(json.loads(pushed.stdout)["mounted"]) == 4
    assert registry.uploads() == uploads


def test_a_docker_archive_is_pushed_with_an_oci_manifest(
    registry: Registry, tmp_path: Path, cli: Cli
) -> None:
    archive = tmp_path / "docker.tar"
    assert cli("build", "--example", "-o", str(archive)).exit_code == 0
    ref = f"{registry.host}/guix/docker:1"
    pushed = cli("push", str(archive), ref, "--digest-file", str(tmp_path / "digest"))
    assert pushed.exit_code == 0, pushed.output
    digest = (tmp_path / "digest").read_text().strip()
    assert skopeo_digest(ref) == digest
    raw = json.loads(
        run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout
    )
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


def test_refusals_and_a_registry_that_does_not_answer(tmp_path: Path, cli: Cli) -> None:
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    bad = cli("push", str(archive), "app:1")
    assert bad.exit_code == 2 and "host[:port]/name[:tag]" in bad.stderr
    nobody = cli("push", str(archive), f"127.0.0.1:{free_port()}/app:1")
    assert nobody.exit_code == 1
    assert "127.0.0.1" in nobody.stderr and "Traceback" not in nobody.output


def test_docker_pulls_and_runs_what_was_pushed(
    registry: Registry, tmp_path: Path, cli: Cli
) -> None:
    """Docker treats registries on 127.0.0.0/8 as insecure: no daemon change is needed."""
    if not docker_answers():
        pytest.skip("no Docker daemon answers `docker info`")
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    ref = f"{registry.host}/guix/run-{uuid.uuid4().hex[:8]}:1"
    assert cli("push", str(archive), ref).exit_code == 0
    try:
        run("docker", "pull", "-q", ref)
        assert run("docker", "run", "--rm", "--network", "none", ref).stdout == "Hello, world!\n"
    finally:
        subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Registry]:
    """A registry behind TLS (a test CA in registry/ca.crt) with Basic authentication."""
    directory = tmp_path / "registry"
    directory.mkdir()
    with running_registry(directory, users={"guix": "s3cret"}) as started:
        yield started


def test_tls_and_basic_authentication(
    secured: Registry, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    ref = f"{secured.host}/guix/secure:1"
    cert_dir = str(secured.log.parent)
    # An unknown CA is not fallen back from to plain HTTP: it is an error.
    untrusted = cli("push", str(archive), ref)
    assert untrusted.exit_code == 1 and "does not verify" in untrusted.stderr
    # No credentials: refused, naming the registry and the repository.
    anonymous = cli("push", str(archive), ref, "--cert-dir", cert_dir)
    assert anonymous.exit_code == 1
    assert secured.host in anonymous.stderr and "guix/secure" in anonymous.stderr
    monkeypatch.setenv("GUIX_IMAGE_PASSWORD", "wrong")
    wrong = cli("push", str(archive), ref, "--cert-dir", cert_dir, "--username", "guix")
    assert wrong.exit_code == 1 and "not authorised" in wrong.stderr
    monkeypatch.setenv("GUIX_IMAGE_PASSWORD", "s3cret")
    pushed = cli("push", str(archive), ref, "--cert-dir", cert_dir, "--username", "guix")
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout == f"{ref}@{manifest_digest(archive)}\n"
    # Credentials as podman login keeps them, and any certificate trusted.
    monkeypatch.delenv("GUIX_IMAGE_PASSWORD")
    auth = tmp_path / "auth.json"
    token = base64.b64encode(b"guix:s3cret").decode()
    auth.write_text(json.dumps({"auths": {secured.host: {"auth": token}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    again = cli("push", str(archive), ref, "--tls-verify=false", "--json")
    assert again.exit_code == 0, again.output
    assert len(json.loads(again.stdout)["present"]) == 4


def test_an_unchanged_image_pushes_with_head_requests_only(
    registry: Registry,
    store: StoreTree,
    tmp_path: Path,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The layer cache knows every blob: no layer is compressed or read."""
    paths = populate(store)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([paths[:1], paths[1:]])))
    ref = f"{registry.host}/guix/again:1"
    first = cli("push", str(config), ref)
    assert first.exit_code == 0, first.output
    seen = len(registry.requests())

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer was read")

    monkeypatch.setattr(StoreLayer, "write_tar", no_reading)
    monkeypatch.setattr(compression.Compression, "compressors", no_reading)
    again = cli("push", str(config), ref, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["digest"] == first.stdout.strip().rpartition("@")[2]
    methods = {method for method, _, _ in registry.requests()[seen:]}
    assert methods == {"HEAD", "PUT"}  # blobs asked for, the manifest put
    assert [p for m, p, _ in registry.requests()[seen:] if m == "PUT"] == [
        "/v2/guix/again/manifests/1"
    ]


@pytest.mark.parametrize("failing", ["PATCH", "PUT"])
def test_a_registry_that_fails_mid_push_leaves_no_tag(
    registry: Registry, tmp_path: Path, cli: Cli, failing: str
) -> None:
    """Every request fails with 503 from the first blob PATCH (or closing PUT)
    on: an upload is started again whole, never sent twice to one session, a
    bounded number of times; then one clear error (exit 1), no manifest put."""
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    proxy = FailingProxy(registry, lambda method, path: method == failing and "/uploads/" in path)
    try:
        failed = cli("push", str(archive), f"{proxy.host}/guix/broken:1")
    finally:
        proxy.close()
    assert failed.exit_code == 1
    assert "HTTP 503" in failed.stderr and "Traceback" not in failed.output
    sent = [path for method, path in proxy.seen if method == failing]
    assert 1 <= len(sent) <= 4 * 4  # four blobs at most, each begun four times at most
    assert len(sent) == len(set(sent))  # no session was sent its bytes twice
    assert not any("/manifests/" in path for _, path in proxy.seen)
    tag = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
              f"http://{registry.host}/v2/guix/broken/manifests/1").stdout  # fmt: skip
    assert tag == "404"


def test_bearer_tokens_through_the_challenge(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry with `auth: token`: the 401's challenge names the realm, which
    gives a token for the repository's pull,push scope to a known user only."""
    directory = tmp_path / "registry"
    directory.mkdir()
    tokens = TokenService(directory, users={"guix": "t0ken"})
    try:
        with running_registry(directory, token_host=tokens.host) as registry:
            archive = tmp_path / "example.tar"
            built = cli("build", "--example", "--format", "oci-archive", "-o", str(archive))
            assert built.exit_code == 0
            ref = f"{registry.host}/guix/tokens:1"
            refused = cli("push", str(archive), ref)
            assert refused.exit_code == 1 and "refused a token" in refused.stderr
            monkeypatch.setenv("GUIX_IMAGE_PASSWORD", "t0ken")
            pushed = cli("push", str(archive), ref, "--username", "guix")
            assert pushed.exit_code == 0, pushed.output
            assert pushed.stdout == f"{ref}@{manifest_digest(archive)}\n"
            assert "repository:guix/tokens:pull,push" in tokens.granted
            # A mount needs pull on the source too: the challenge asks for both.
            mounted = cli("push", str(archive), f"{registry.host}/guix/copy:1", "--username",
                          "guix", "--from-repo", "guix/tokens", "--json")  # fmt: skip
            assert mounted.exit_code == 0, mounted.output
            assert len(json.loads(mounted.stdout)["mounted"]) == 4
            assert "repository:guix/tokens:pull" in tokens.granted
    finally:
        tokens.close()


def test_the_readers_read_from_a_registry(registry: Registry, tmp_path: Path, cli: Cli) -> None:
    """inspect, verify (and --against) and diff-layers take docker://REF: the
    manifest and config fetched, layers streamed, every digest checked."""
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    ref = f"{registry.host}/guix/read:1"
    assert cli("push", str(archive), ref).exit_code == 0
    remote = f"docker://{ref}"
    shown = inspect_json(cli, remote)
    assert shown["format"] == "registry" and shown["repo_tags"] == [ref]
    assert [layer["digest"] for layer in shown["layers"]] == [
        layer["digest"] for layer in inspect_json(cli, archive)["layers"]
    ]
    verified = cli("verify", remote, "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"] is True
    assert cli("verify", str(archive), "--against", remote).exit_code == 0
    same = cli("diff-layers", str(archive), remote)
    assert same.exit_code == 0 and "Identical." in same.stdout
    missing = cli("inspect", f"docker://{registry.host}/guix/read:2")
    assert missing.exit_code == 2 and "no manifest 2" in missing.stderr


def test_store_items_with_builds_options(
    registry: Registry, store: StoreTree, tmp_path: Path, cli: Cli
) -> None:
    """push STORE_ITEM... REF takes build's options; pushed again, nothing is uploaded."""
    busybox = busybox_store(store)
    database = make_database(tmp_path / "db.sqlite", {busybox: nar_hash(busybox)}, {})
    ref = f"{registry.host}/guix/busybox:1"
    flags = ["--db", str(database), "-S", "/bin=bin", "--entrypoint", "/bin/busybox"]
    pushed = cli("push", str(busybox), *flags, ref, "--json")
    assert pushed.exit_code == 0, pushed.output
    assert len(json.loads(pushed.stdout)["uploaded"]) == 3  # the item, the links, the config
    config = json.loads(
        run("skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{ref}").stdout
    )
    assert config["config"]["Entrypoint"] == ["/bin/busybox"]
    uploads = registry.uploads()
    again = cli("push", str(busybox), *flags, ref, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["digest"] == json.loads(pushed.stdout)["digest"]
    assert registry.uploads() == uploads
    out_of_place = cli("push", str(tmp_path / "db.sqlite"), "--entrypoint", "x", ref)
    assert out_of_place.exit_code == 2 and "goes with STORE_ITEMs" in out_of_place.stderr


def test_a_push_to_another_repository_mounts_what_earlier_pushes_put(
    registry: Registry, tmp_path: Path, cli: Cli
) -> None:
    """Without --from-repo: the blobs are mounted from where the last push put
    them (remembered beside the layer cache), not uploaded again."""
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0
    assert cli("push", str(archive), f"{registry.host}/first/app:1").exit_code == 0
    uploads = registry.uploads()
    second = cli("push", str(archive), f"{registry.host}/second/app:1", "--json")
    assert second.exit_code == 0, second.output
    assert len(json.loads(second.stdout)["mounted"]) == 4
    assert registry.uploads() == uploads
    mounts = [p for m, p, s in registry.requests() if m == "POST" and "mount=" in p and s == 201]
    assert len(mounts) == 4 and all("from=first%2Fapp" in p for p in mounts)


def test_a_registry_stopped_mid_push_leaves_no_tag(
    registry: Registry, tmp_path: Path, cli: Cli
) -> None:
    """The registry process is stopped as the first blob's bytes arrive: one
    clear error after bounded retries (exit 1), and no tag in its storage."""
    archive = tmp_path / "example.tar"
    assert cli("build", "--example", "--format", "oci-archive", "-o", str(archive)).exit_code == 0

    def stop_on_patch(method: str, path: str) -> bool:
        if method == "PATCH":
            registry.stop()
        return False  # forwarded, to a registry that is gone

    proxy = FailingProxy(registry, stop_on_patch)
    try:
        failed = cli("push", str(archive), f"{proxy.host}/guix/stopped:1")
    finally:
        proxy.close()
    assert failed.exit_code == 1, failed.output
    last = failed.stderr.splitlines()[-1]
    assert last.startswith(f"Error: {proxy.host}: ") and "Traceback" not in failed.output
    tags = registry.log.parent / "storage/docker/registry/v2/repositories/guix/stopped/_manifests"
    assert not tags.exists()
