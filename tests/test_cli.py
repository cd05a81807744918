"""The command line: help texts, completion, terminal conventions, man pages, and
`guix-image build` (options, messages, exit codes, signals, its pipelines)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from guix_image import __version__
from guix_image.cli import main
from guix_image.cli.completion import SCRIPT_FILES, SHELLS
from guix_image.cli.manpage import all_pages

from .support.archives import read_archive
from .support.stores import BuildFn, StoreTree, write_config
from .support.tools import GUIX_IMAGE, children

TOP = Path(__file__).resolve().parent.parent
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-7]m|\x1b\[[0-9;]*9[0-7]m|\x1b\[[0-9;]*38;")


# -- help texts: every command and option documented, as sqlite-utils checks ----


def all_commands(
    group: click.Group = main, prefix: str = "guix-image"
) -> list[tuple[str, click.Command]]:
    commands: list[tuple[str, click.Command]] = [(prefix, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            commands.extend(all_commands(command, f"{prefix} {name}"))
        else:
            commands.append((f"{prefix} {name}", command))
    return commands


@pytest.mark.parametrize(
    ("path", "command"), all_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_command_and_option_has_help(path: str, command: click.Command) -> None:
    assert command.help, f"{path} has no help text"
    assert command.short_help or command.help.split("\n")[0], path
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{path} option {param.opts} has no help text"


def test_top_level_help_lists_the_four_commands(cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("build", "inspect", "diff-layers", "verify"):
        assert f"  {name} " in result.output


def test_version(cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


# -- at home in a terminal: completion, help, output conventions, man pages -----


def complete(words: str, cwd: Path | None = None) -> tuple[list[tuple[str, str]], float]:
    """Ask for completions as bash does; (type, value) pairs and the seconds it took."""
    env = {
        **os.environ,
        "_GUIX_IMAGE_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    started = time.monotonic()
    result = subprocess.run(
        [*GUIX_IMAGE], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    elapsed = time.monotonic() - started
    pairs = [tuple(line.split(",", 1)) for line in result.stdout.splitlines() if line]
    return pairs, elapsed  # type: ignore[return-value]


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completion_scripts_match_the_command(shell: str, cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(main, ["completion", shell])
    assert result.exit_code == 0
    committed = (TOP / "completions" / SCRIPT_FILES[shell]).read_text()
    assert result.output == committed, (
        f"regenerate: guix-image completion {shell} > completions/{SCRIPT_FILES[shell]}"
    )
    assert "_GUIX_IMAGE_COMPLETE" in committed


def test_unknown_shell_is_refused(cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(main, ["completion", "tcsh"])
    assert result.exit_code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.stderr


def test_commands_and_options_complete() -> None:
    commands, _ = complete("guix-image ")
    assert {value for _, value in commands} >= {
        "build",
        "inspect",
        "diff-layers",
        "verify",
        "completion",
    }
    options, _ = complete("guix-image verify --re")
    assert ("plain", "--rebuild") in options


@pytest.fixture
def workspace(store: StoreTree, build: BuildFn, tmp_path: Path) -> Path:
    space = tmp_path / "space"
    space.mkdir()
    image, _ = build(
        store.config(
            [[store.item("a", {"f": "1"})], [store.item("b", {"g": "2"})]], repo_tag="app:1.0"
        )
    )
    shutil.copy(image, space / "app.tar")
    (space / "image.json").write_text("{}")
    (space / "notes.txt").write_text("")
    (space / "layout").mkdir()
    (space / "layout" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return space


def test_archives_configs_tags_and_layers_complete(workspace: Path) -> None:
    archives, elapsed = complete("guix-image inspect ", workspace)
    assert sorted(value for _, value in archives) == ["app.tar", "layout"]
    assert elapsed < 3  # generous here; the benchmark measures it precisely
    configs, _ = complete("guix-image build ", workspace)
    assert [value for _, value in configs] == ["image.json"]
    nothing, _ = complete("guix-image build sub", workspace)
    assert nothing == [("file", "sub")]  # no JSON matches: the shell completes files
    tags, elapsed = complete("guix-image inspect app.tar --image ", workspace)
    assert [value for _, value in tags] == ["app:1.0", "1"]
    assert elapsed < 3
    layers, _ = complete("guix-image inspect app.tar --files ", workspace)
    assert [value for _, value in layers] == ["1", "2"]
    rebuild, _ = complete("guix-image verify app.tar --rebuild ", workspace)
    assert [value for _, value in rebuild] == ["image.json"]


def installed_script() -> str | None:
    script = Path(sysconfig.get_path("scripts")) / "guix-image"
    return str(script) if script.exists() else shutil.which("guix-image")


def screen_showing(session: str, text: str) -> str:
    """The tmux pane once it shows `text`, or as it is after five seconds."""
    screen = ""
    for _ in range(50):
        time.sleep(0.1)
        pane = ["tmux", "capture-pane", "-p", "-t", session]
        screen = subprocess.run(pane, capture_output=True, text=True).stdout
        if text in screen:
            break
    return screen


@pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"
)
def test_tab_completes_in_a_real_bash(workspace: Path, tmp_path: Path) -> None:
    script = installed_script()
    if script is None:
        pytest.skip("guix-image is not installed as a command (pip install .)")
    rc = tmp_path / "bashrc"
    rc.write_text(
        f"PS1='$ '\nexport PATH={Path(script).parent}:$PATH\n"
        f"source {TOP / 'completions' / 'guix-image.bash'}\ncd {workspace}\n"
    )
    session = f"guix-image-test-{os.getpid()}"
    subprocess.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "200",
            "-y",
            "50",
            f"bash --rcfile {rc} -i",
        ],
        check=True,
    )
    try:
        time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", session, "guix-image insp", "Tab"], check=True)
        assert "$ guix-image inspect" in screen_showing(session, "$ guix-image inspect")
        keys = ["app.tar --image ", "Tab", "Tab"]
        subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)
        assert "app:1.0" in screen_showing(session, "app:1.0")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def every_command() -> list[tuple[str, click.Command]]:
    return [(f"guix-image {name}", command) for name, command in main.commands.items()]


@pytest.mark.parametrize(
    ("path", "command"), every_command(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_command_has_a_summary_and_examples(
    path: str, command: click.Command, cli_runner: CliRunner
) -> None:
    result = cli_runner.invoke(main, [*path.split()[1:], "--help"])
    assert result.exit_code == 0
    summary = command.get_short_help_str(limit=200)
    assert summary and not summary.endswith("..."), path
    assert "Examples:" in result.output, path
    examples = result.output.split("Examples:", 1)[1].split("Options:", 1)[0]
    assert 2 <= examples.count("guix-image ") <= 6, path


def test_no_arguments_shows_the_commands_and_a_first_step(cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(main, [])
    assert result.exit_code == 0
    assert "Commands:" in result.output
    assert "guix-image build --example -o example.tar" in result.output


def test_common_options_work_before_and_after_the_command(
    workspace: Path, cli_runner: CliRunner
) -> None:
    archive = str(workspace / "app.tar")
    for args in (
        ["-q", "--no-color", "inspect", archive],
        ["inspect", archive, "-q", "--no-color"],
    ):
        result = cli_runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Format:")


def test_json_is_one_document_on_stdout_and_nothing_else(workspace: Path) -> None:
    archive = str(workspace / "app.tar")
    for args in (["inspect", archive], ["verify", archive], ["diff-layers", archive, archive]):
        result = subprocess.run(
            [*GUIX_IMAGE, *args, "--json", "-v"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)  # exactly one document
        assert "read in" in result.stderr  # -v speaks on stderr only


def test_quiet_and_verbose_on_build(
    store: StoreTree, tmp_path: Path, cli_runner: CliRunner
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([[store.item("q", {"f": "1"})]])))
    quiet = cli_runner.invoke(main, ["build", str(config), "-o", str(tmp_path / "o.tar"), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    verbose = cli_runner.invoke(
        main, ["build", str(config), "-o", str(tmp_path / "o.tar"), "-v", "--no-cache"]
    )
    assert "layer 1: sha256:" in verbose.stderr and "(hashed)" in verbose.stderr
    again = cli_runner.invoke(main, ["-v", "build", str(config), "-o", str(tmp_path / "o.tar")])
    assert "(cached digest confirmed" in again.stderr


def test_colour_on_a_terminal_only_and_never_with_no_color(workspace: Path) -> None:
    command = [*GUIX_IMAGE, "verify", str(workspace / "app.tar")]
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    assert ANSI_COLOUR.search(on_a_terminal(command, "stdout", env)[2])
    assert not ANSI_COLOUR.search(on_a_terminal(command, "stdout", {**env, "NO_COLOR": "1"})[2])
    assert not ANSI_COLOUR.search(on_a_terminal([*command, "--no-color"], "stdout", env)[2])
    piped = subprocess.run(command, capture_output=True, text=True, env=env)
    assert "\x1b[" not in piped.stdout
    assert piped.stdout.splitlines()[0] == "PASS  config digest"


def test_man_pages_match_the_commands() -> None:
    pages = all_pages(main)
    directory = TOP / "guix_image" / "man"
    assert sorted(p.name for p in directory.glob("*.1")) == sorted(pages)
    for name, page in pages.items():
        assert (directory / name).read_text() == page, (
            f"regenerate: python3 -m guix_image.cli.manpage guix_image/man ({name})"
        )
    assert ".SH EXAMPLES" not in pages["guix-image-build.1"]  # examples stay in DESCRIPTION
    assert "guix\\-image build \\-\\-example" in pages["guix-image-build.1"]


def test_a_reader_that_stops_early_is_not_an_error(store: StoreTree, build: BuildFn) -> None:
    many = store.item("many", {f"file-{i:05d}-{'x' * 60}": "" for i in range(3000)})
    archive, _ = build(store.config([[many]]))  # its listing is far more than a pipe holds
    pipeline = subprocess.run(
        f"{sys.executable} -m guix_image inspect {archive} --files | head -1; "
        "echo status=${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert pipeline.stdout.splitlines()[0].startswith("MODE")
    assert pipeline.stdout.splitlines()[-1] == "status=141"  # as if killed by SIGPIPE
    assert pipeline.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_full_disk_is_one_line_and_exit_1(workspace: Path) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*GUIX_IMAGE, "inspect", str(workspace / "app.tar")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == 1
    assert result.stderr == "Error: cannot write the output: No space left on device\n"


def test_the_quick_exit_flushes_everything_first(
    store: StoreTree, build: BuildFn, tmp_path: Path, cli_runner: CliRunner
) -> None:
    # The console entry point ends with os._exit: whatever was written to
    # stdout and stderr must be out by then, and the exit code kept.
    many = store.item("many", {f"file-{i:05d}": str(i) for i in range(3000)})
    archive, _ = build(store.config([[many]]))
    expected = cli_runner.invoke(main, ["inspect", str(archive), "--files", "--json"])
    assert expected.exit_code == 0
    listing = subprocess.run(
        [*GUIX_IMAGE, "inspect", str(archive), "--files", "--json"], capture_output=True
    )
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == json.loads(expected.stdout)
    with (tmp_path / "listing.txt").open("wb") as file:  # a file, not a pipe
        code = subprocess.run([*GUIX_IMAGE, "inspect", str(archive), "--files"], stdout=file)
    assert code.returncode == 0
    assert (tmp_path / "listing.txt").read_text().count("file-0") == 3000
    (tmp_path / "broken.tar").write_bytes(archive.read_bytes()[:-5000])
    failed = subprocess.run(
        [*GUIX_IMAGE, "inspect", str(tmp_path / "broken.tar")], capture_output=True
    )
    assert failed.returncode == 2
    assert failed.stdout == b""
    assert "truncated archive" in failed.stderr.decode()
    assert failed.stderr.decode().count("\n") == 1
    checked = subprocess.run(
        [*GUIX_IMAGE, "verify", str(tmp_path / "broken.tar")], capture_output=True
    )
    assert checked.returncode == 1  # a damaged archive is a failed check
    assert b"truncated archive" in checked.stdout and checked.stderr == b""


def test_tree_needs_files_and_root_does_not_go_with_example(
    image_file: Path, cli_runner: CliRunner
) -> None:
    assert cli_runner.invoke(main, ["inspect", str(image_file), "--tree"]).exit_code == 2
    assert cli_runner.invoke(main, ["build", "--example", "--root", "/"]).exit_code == 2


# -- `guix-image build`: options, messages, exit codes, signals ------------------


def test_build_to_a_file(store: StoreTree, tmp_path: Path, cli_runner: CliRunner) -> None:
    item = store.item("x", {"f": "1"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert read_archive(output)["manifest"][0]["RepoTags"] == ["test/image:latest"]
    assert "Creating layer 1 from paths:" in result.stderr
    assert "Done: sha256:" in result.stderr
    assert oct(output.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_build_to_a_file_runs_the_forked_pipeline(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("x", {"f": "1" * 100_000})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    result = subprocess.run(
        [*GUIX_IMAGE, "build", "-v", str(config), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert read_archive(output)["manifest"][0]["RepoTags"] == ["test/image:latest"]
    assert "hashed and written in a forked process" in result.stderr, result.stderr


def test_build_to_stdout_and_from_stdin(store: StoreTree) -> None:
    item = store.item("x", {"f": "1"})
    document = json.dumps(store.config([[item]]))
    result = subprocess.run(
        [*GUIX_IMAGE, "build", "-", "-q"], input=document.encode(), capture_output=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout[257:262] == b"ustar"  # a tar archive on stdout


def test_tag_option_overrides_repo_tag(
    store: StoreTree, tmp_path: Path, cli_runner: CliRunner
) -> None:
    item = store.item("x", {"f": "1"})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    result = cli_runner.invoke(
        main, ["build", str(config), "-t", "other:2", "-o", str(output), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert read_archive(output)["manifest"][0]["RepoTags"] == ["other:2"]


def test_bad_config_is_one_line_and_exit_2(
    store: StoreTree, tmp_path: Path, cli_runner: CliRunner
) -> None:
    config = write_config(tmp_path / "c.json", store.config([["/elsewhere/x"]]))
    output = tmp_path / "out.tar"
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(output)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert (
        "config field 'store_layers'[0][0]: /elsewhere/x is not inside store_dir" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_not_json_is_exit_2(tmp_path: Path, cli_runner: CliRunner) -> None:
    config = tmp_path / "c.json"
    config.write_text("{nope")
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(tmp_path / "o.tar")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {config}: not valid JSON")


def test_debug_shows_the_traceback(tmp_path: Path, cli_runner: CliRunner) -> None:
    config = tmp_path / "c.json"
    config.write_text("[]")
    result = cli_runner.invoke(
        main, ["--debug", "build", str(config), "-o", str(tmp_path / "o.tar")]
    )
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_missing_config_file_is_exit_2(tmp_path: Path, cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(main, ["build", str(tmp_path / "none.json")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "none.json: No such file or directory" in result.stderr


def test_config_and_example_are_exclusive(tmp_path: Path, cli_runner: CliRunner) -> None:
    config = write_config(tmp_path / "c.json", {})
    assert cli_runner.invoke(main, ["build", str(config), "--example"]).exit_code == 2
    assert cli_runner.invoke(main, ["build"]).exit_code == 2


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


def test_example_builds_and_is_reproducible(tmp_path: Path, cli_runner: CliRunner) -> None:
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    for output in (first, second):
        result = cli_runner.invoke(main, ["build", "--example", "-o", str(output)])
        assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as outer:
        assert outer.getnames()[-1] == "manifest.json"
    image = read_archive(first)
    assert image["manifest"][0]["RepoTags"] == ["guix-image-example:latest"]
    assert len(image["layers"]) == 3


def test_failure_leaves_no_output_and_keeps_an_old_file(
    store: StoreTree, tmp_path: Path, cli_runner: CliRunner
) -> None:
    item = store.item("x", {"f": "1"})
    os.mkfifo(item / "fifo")
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    output = tmp_path / "out.tar"
    output.write_text("previous")
    result = cli_runner.invoke(main, ["build", str(config), "-o", str(output)])
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


def on_a_terminal(
    command: list[str], stream: str = "stderr", env: dict[str, str] | None = None, stdin: Any = None
) -> tuple[int, bytes, str]:
    """Run `command` with `stream` ("stderr" or "stdout") on a pseudo-terminal, draining
    it as the command runs, in the environment `env` (by default this one); its status,
    its standard output (when that is not the terminal), and what the terminal showed."""
    leader, follower = pty.openpty()
    with tempfile.TemporaryFile() as stdout:
        streams = {"stdout": stdout, "stderr": subprocess.DEVNULL, stream: follower}
        process = subprocess.Popen(
            command, stdin=stdin, env=os.environ if env is None else env, **streams
        )
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
        status = process.wait(timeout=60)
        stdout.seek(0)
        return status, stdout.read(), b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_lines_otherwise(store: StoreTree, tmp_path: Path) -> None:
    first, second = (store.item(name, {"f": "1" * 100_000}) for name in ("x", "y"))
    config = write_config(tmp_path / "c.json", store.config([[first], [second]]))
    command = [*GUIX_IMAGE, "build", str(config), "-o", str(tmp_path / "o.tar")]
    status, _, drawn = on_a_terminal(command)
    assert status == 0
    assert "layer 2/2" in drawn
    assert "\x1b[" in drawn  # terminal control sequences: a live bar
    assert "Creating layer" not in drawn
    assert "Done: sha256:" in drawn
    piped = subprocess.run(command, capture_output=True, text=True)
    assert "\x1b[" not in piped.stderr
    assert piped.stderr.splitlines()[:2] == [
        f'Creating layer 1 from paths: ["{first}"]',
        f'Creating layer 2 from paths: ["{second}"]',
    ]


def test_build_into_a_closed_pipe_stops_quietly(store: StoreTree, tmp_path: Path) -> None:
    item = store.item("p", {"f": os.urandom(3 << 20).hex()})
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([[item]])))
    pipeline = subprocess.run(
        f"{sys.executable} -m guix_image build -q {config} | head -c 100 > /dev/null; "
        "echo status=${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert pipeline.stdout.strip() == "status=141"
    assert pipeline.stderr == ""


# -- closed standard streams, early interrupts ------------------------------------------


def run_with_closed(fd: int, arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """guix-image with standard descriptor `fd` closed, as `>&-` leaves it."""
    return subprocess.run(
        [*GUIX_IMAGE, *arguments],
        cwd=cwd,
        capture_output=fd != 2,
        stdout=None if fd != 2 else subprocess.PIPE,
        pass_fds=(),
        preexec_fn=lambda: os.close(fd),
        timeout=60,
    )


def test_a_closed_stdout_is_an_error_never_a_silent_loss(tmp_path: Path) -> None:
    built = run_with_closed(1, ["build", "--example"], tmp_path)
    assert built.returncode == 2
    assert built.stderr.decode() == "Error: standard output is closed; use -o FILE\n"
    archive = tmp_path / "e.tar"
    assert (
        run_with_closed(1, ["build", "--example", "-q", "-o", str(archive)], tmp_path).returncode
        == 0
    )
    listed = run_with_closed(1, ["inspect", str(archive)], tmp_path)
    assert listed.returncode == 1
    assert listed.stderr.decode() == "Error: cannot write the output: standard output is closed\n"


def test_a_closed_stderr_never_puts_diagnostics_into_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "e.tar"
    built = run_with_closed(2, ["build", "--example", "-o", str(archive)], tmp_path)
    assert built.returncode == 0
    with tarfile.open(archive) as tar:
        assert tar.getnames()[-1] == "manifest.json"
    reference = tmp_path / "ref.tar"
    assert (
        subprocess.run([*GUIX_IMAGE, "build", "--example", "-q", "-o", str(reference)]).returncode
        == 0
    )
    assert archive.read_bytes() == reference.read_bytes()
    to_stdout = run_with_closed(2, ["build", "--example"], tmp_path)
    assert to_stdout.returncode == 0 and to_stdout.stdout == reference.read_bytes()


def test_a_closed_stdin_reads_as_empty(tmp_path: Path) -> None:
    result = run_with_closed(0, ["inspect", "-"], tmp_path)
    assert result.returncode == 2
    assert b"not an image archive" in result.stderr and b"Traceback" not in result.stderr


def python_start_up() -> float:
    """How long this Python takes to start and do nothing (the least of three)."""
    times = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - started)
    return min(times)


def test_an_early_interrupt_prints_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C while guix-image imports itself ends quietly (before that, during the
    interpreter's own start, what happens is Python's)."""
    start_up = python_start_up()
    for after in (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15):
        delay = start_up + after
        process = subprocess.Popen(
            [*GUIX_IMAGE, "build", "--example", "-o", str(tmp_path / "e.tar")],
            stderr=subprocess.PIPE,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        # No frame of ours in a traceback: one from Python's own start (its site
        # module, runpy finding the package) comes before any code of ours runs.
        if b"init_import_site" in stderr:
            continue  # Python's start, before any of guix-image
        assert not re.search(rb'File "[^"]*/guix_image/', stderr), (delay, stderr)
        assert process.returncode in (130, -signal.SIGINT, 0), (delay, process.returncode)


def test_one_pipe_given_twice_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for arguments in (
        ["diff-layers", str(fifo), str(fifo)],
        ["verify", str(fifo), "--against", str(fifo)],
    ):
        result = subprocess.run(
            [*GUIX_IMAGE, *arguments], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2
        assert "one pipe, which can be read only once" in result.stderr


def test_a_terminal_on_standard_input_is_refused(image_file: Path) -> None:
    """`inspect -` typed at a terminal would wait for ever: it says why instead."""
    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [*GUIX_IMAGE, "inspect", "-"], stdin=follower, capture_output=True, timeout=60
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == 2
    assert b"standard input is a terminal, not an archive" in result.stderr


def test_files_does_not_swallow_the_archive(image_file: Path, cli_runner: CliRunner) -> None:
    before = cli_runner.invoke(main, ["inspect", str(image_file), "--files"])
    after = cli_runner.invoke(main, ["inspect", "--files", str(image_file)])
    assert before.exit_code == after.exit_code == 0, after.output
    assert before.stdout == after.stdout
    missing = cli_runner.invoke(main, ["inspect", "--files", "3"])
    assert missing.exit_code == 2 and "Missing argument 'ARCHIVE'" in missing.stderr


def test_quiet_means_failures_only(image_file: Path, tmp_path: Path, cli_runner: CliRunner) -> None:
    passed = cli_runner.invoke(main, ["verify", "-q", str(image_file)])
    assert passed.exit_code == 0 and passed.stdout == ""
    same = cli_runner.invoke(main, ["diff-layers", "-q", str(image_file), str(image_file)])
    assert same.exit_code == 0 and same.stdout == ""
    broken = tmp_path / "broken.tar"
    broken.write_bytes(image_file.read_bytes()[:-5000])
    failed = cli_runner.invoke(main, ["verify", "-q", str(broken)])
    assert failed.exit_code == 1
    assert [line.split()[0] for line in failed.stdout.splitlines()] == ["FAIL", "FAILED:"]


def test_reading_standard_input_shows_progress_at_a_terminal(image_file: Path) -> None:
    """A stream of unknown length: a line on stderr counts what arrived (a terminal),
    and the result is the same as without it."""
    with image_file.open("rb") as archive:
        command = [*GUIX_IMAGE, "inspect", "-", "--json"]
        status, stdout, shown = on_a_terminal(
            command, env={**os.environ, "COLUMNS": "100"}, stdin=archive
        )
    assert status == 0
    assert json.loads(stdout)["layers"]
    assert "reading standard input" in shown


def test_a_terminal_of_80_columns_never_cuts_a_digest(image_file: Path) -> None:
    """The layer table at a narrow terminal: whole short digests, lines within 80."""
    narrow = {**os.environ, "COLUMNS": "80", "LINES": "50", "NO_COLOR": "1"}
    status, _, shown = on_a_terminal([*GUIX_IMAGE, "inspect", str(image_file)], "stdout", narrow)
    assert status == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", shown)  # bold headers
    table = text[text.index("DIFF ID") :].splitlines()
    digests = re.findall(r"sha256:[0-9a-f]+", "\n".join(table))
    assert digests and all(len(d) == len("sha256:") + 12 for d in digests)
    assert all(len(line.rstrip()) <= 80 for line in table)
    header = text[text.rindex("\n", 0, text.index("DIFF ID")) + 1 :].splitlines()[0]
    assert header.split() == ["#", "DIFF", "ID", "SIZE", "ENTRIES", "COMPRESSION", "COMMENT"]


def test_the_progress_bar_fits_80_columns_and_names_the_package() -> None:
    """One line that fits 80 columns: the package's name (not its hash), the sizes
    whole, the layer count."""
    from rich.console import Console

    from guix_image.cli.progress import BarProgress

    bar = BarProgress(Console(file=io.StringIO(), width=80, force_terminal=True))
    paths = [f"/gnu/store/{'a' * 32}-python3-3.11.7", f"/gnu/store/{'b' * 32}-zlib-1.3"]
    bar.layer_started(3, 6, f"from paths: {json.dumps(paths)}")
    bar.layer_sized(585_000_000)
    bar.layer_progress(240_000_000)
    bar.close()
    frame = Console(file=io.StringIO(), width=80, record=True)  # the bar, drawn once
    frame.print(bar._progress.get_renderable())
    lines = [line for line in frame.export_text().splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    shown = lines[0]
    assert "layer 3/6" in shown and "240.0/585.0 MB" in shown
    assert "python3-3.11.7 (+1 more)" in shown and "a" * 32 not in shown


def test_no_color_and_the_done_line(store: StoreTree, tmp_path: Path) -> None:
    """NO_COLOR set to something turns colour off, set empty does not (no-color.org);
    Done: says sizes in human units, with plurals right."""
    item = store.item("python3-3.11.7", {f"lib/f{n}": os.urandom(20_000).hex() for n in range(50)})
    config = write_config(tmp_path / "c.json", store.config([[item]]))
    command = [*GUIX_IMAGE, "build", str(config), "-o", str(tmp_path / "o.tar")]
    colour = re.compile(r"\x1b\[[0-9;]*3[0-9]m|\x1b\[38;")
    status, _, drawn = on_a_terminal(command, env={**os.environ, "COLUMNS": "80", "NO_COLOR": ""})
    assert status == 0 and colour.search(drawn)
    status, _, plain = on_a_terminal(command, env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"})
    assert status == 0 and not colour.search(plain)
    assert re.search(r"Done: sha256:\S+ \(test/image:latest\), 1 layer, [0-9.]+ [kM]B to ", plain)
