"""`guix-image build` from the command line: options, messages, exit codes, signals."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from click.testing import CliRunner

from guix_image.cli import main

from .conftest import StoreTree, children, read_archive, write_config

GUIX_IMAGE = [sys.executable, "-m", "guix_image"]


def test_build_to_a_file(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    result = CliRunner().invoke(main, ["build", str(config), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert read_archive(output)["manifest"][0]["RepoTags"] == ["test/image:latest"]
    assert "Creating layer 1 from paths:" in result.stderr
    assert "Done: sha256:" in result.stderr
    assert oct(output.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_build_to_stdout_and_from_stdin(store: StoreTree) -> None:
    item = store.item("x", {"f": "1"})
    document = json.dumps(store.config([[item]]))
    result = subprocess.run(
        [*GUIX_IMAGE, "build", "-", "-q"], input=document.encode(), capture_output=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout[257:262] == b"ustar"  # a tar archive on stdout


def test_tag_option_overrides_repo_tag(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    result = CliRunner().invoke(
        main, ["build", str(config), "-t", "other:2", "-o", str(output), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert read_archive(output)["manifest"][0]["RepoTags"] == ["other:2"]


def test_bad_config_is_one_line_and_exit_2(store: StoreTree, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.json", store.config([["/elsewhere/x"]]))
    output = tmp_path / "out.tar"
    result = CliRunner().invoke(main, ["build", str(config), "-o", str(output)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert (
        "config field 'store_layers'[0][0]: /elsewhere/x is not inside store_dir" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_not_json_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text("{nope")
    result = CliRunner().invoke(main, ["build", str(config), "-o", str(tmp_path / "o.tar")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {config}: not valid JSON")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text("[]")
    result = CliRunner().invoke(
        main, ["--debug", "build", str(config), "-o", str(tmp_path / "o.tar")]
    )
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(tmp_path / "none.json")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "none.json': No such file or directory" in result.stderr


def test_config_and_example_are_exclusive(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.json", {})
    assert CliRunner().invoke(main, ["build", str(config), "--example"]).exit_code == 2
    assert CliRunner().invoke(main, ["build"]).exit_code == 2


def test_refuses_to_write_to_a_terminal(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [*GUIX_IMAGE, "build", str(config)], stdout=follower, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 2
    assert b"refusing to write an image archive to a terminal" in result.stderr


def test_example_builds_and_is_reproducible(tmp_path: Path) -> None:
    runner = CliRunner()
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    for output in (first, second):
        result = runner.invoke(main, ["build", "--example", "-o", str(output)])
        assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as outer:
        assert outer.getnames()[-1] == "manifest.json"
    image = read_archive(first)
    assert image["manifest"][0]["RepoTags"] == ["guix-image-example:latest"]
    assert len(image["layers"]) == 3


def test_failure_leaves_no_output_and_keeps_an_old_file(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1"})
    os.mkfifo(item / "fifo")
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    output.write_text("previous")
    result = CliRunner().invoke(main, ["build", str(config), "-o", str(output)])
    assert result.exit_code == 2
    assert "/fifo is a fifo" in result.stderr
    assert output.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "out.tar", "store-root"]


def wait_for_partial_file(directory: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [p for p in directory.iterdir() if p.name.endswith(".part")]
        if parts and parts[0].stat().st_size > 0:
            return
        time.sleep(0.01)
    raise AssertionError("the build never started writing")


def test_sigterm_and_sigint_leave_nothing(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("big")
    with open(item / "blob", "wb") as f:
        f.truncate(1 << 30)  # sparse: cheap to make, slow enough to interrupt
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        process = subprocess.Popen(
            [*GUIX_IMAGE, "build", str(config), "-o", str(out_dir / "image.tar"), "-q"],
            stderr=subprocess.PIPE,
        )
        wait_for_partial_file(out_dir)
        helpers = children(process.pid)
        assert helpers, "the build hashes in a forked process"
        masks = signal_masks(process.pid)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == code, (stderr, masks)
        assert list(out_dir.iterdir()) == []
        assert [pid for pid in helpers if Path(f"/proc/{pid}").exists()] == []


def test_a_signal_ends_a_build_whose_reader_stopped_reading(
    store: StoreTree, tmp_path: Path
) -> None:
    item = store.item("big")
    with open(item / "blob", "wb") as f:
        f.truncate(1 << 30)
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        process = subprocess.Popen(  # nobody reads its output: it fills the pipe and waits
            [*GUIX_IMAGE, "build", str(config), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        helpers = wait_for_children(process.pid)
        time.sleep(0.5)  # long enough to fill the pipe and every block
        masks = signal_masks(process.pid)
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"signal {sig} did not end the build; {masks}") from None
        finally:
            process.kill()
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            stderr = process.stderr.read().decode()
            process.stderr.close()
        assert process.returncode == code, stderr
        assert "Traceback" not in stderr
        assert [pid for pid in helpers if Path(f"/proc/{pid}").exists()] == []


def signal_masks(pid: int) -> str:
    """What the process blocks, ignores and catches (for a failure's message)."""
    status = Path(f"/proc/{pid}/status").read_text()
    wanted = ("SigBlk", "SigIgn", "SigCgt")
    return " ".join(line for line in status.splitlines() if line.startswith(wanted))


def wait_for_children(pid: int) -> list[int]:
    deadline = time.monotonic() + 30
    while not (found := children(pid)):
        assert time.monotonic() < deadline, "the build never forked its hashing process"
        time.sleep(0.01)
    return found


def run_with_terminal_stderr(command: list[str]) -> tuple[int, str]:
    """Run `command` with stderr on a pseudo-terminal; return its status and what it drew."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_lines_otherwise(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1" * 100_000})
    config = write_config(tmp_path / "c.json", store.config([[item], [item]]))
    command = [*GUIX_IMAGE, "build", str(config), "-o", str(tmp_path / "o.tar")]
    status, drawn = run_with_terminal_stderr(command)
    assert status == 0
    assert "layer 2/2" in drawn
    assert "\x1b[" in drawn  # terminal control sequences: a live bar
    assert "Creating layer" not in drawn
    assert "Done: sha256:" in drawn
    piped = subprocess.run(command, capture_output=True, text=True)
    assert "\x1b[" not in piped.stderr
    assert piped.stderr.splitlines()[:2] == [
        f'Creating layer 1 from paths: ["{item}"]',
        f'Creating layer 2 from paths: ["{item}"]',
    ]
