"""At home in a terminal: completion, help, output conventions, man pages."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from guix_image.cli import main
from guix_image.completion import SCRIPT_FILES, SHELLS
from guix_image.manpage import all_pages

from .conftest import BuildFn, StoreTree

TOP = Path(__file__).resolve().parent.parent
GUIX_IMAGE = [sys.executable, "-m", "guix_image"]
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-7]m|\x1b\[[0-9;]*9[0-7]m|\x1b\[[0-9;]*38;")


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
def test_committed_completion_scripts_match_the_command(shell: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0
    committed = (TOP / "completions" / SCRIPT_FILES[shell]).read_text()
    assert result.output == committed, (
        f"regenerate: guix-image completion {shell} > completions/{SCRIPT_FILES[shell]}"
    )
    assert "_GUIX_IMAGE_COMPLETE" in committed


def test_unknown_shell_is_refused() -> None:
    result = CliRunner().invoke(main, ["completion", "tcsh"])
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
def test_every_command_has_a_summary_and_examples(path: str, command: click.Command) -> None:
    result = CliRunner().invoke(main, [*path.split()[1:], "--help"])
    assert result.exit_code == 0
    summary = command.get_short_help_str(limit=200)
    assert summary and not summary.endswith("..."), path
    assert "Examples:" in result.output, path
    examples = result.output.split("Examples:", 1)[1].split("Options:", 1)[0]
    assert 2 <= examples.count("guix-image ") <= 6, path


def test_no_arguments_shows_the_commands_and_a_first_step() -> None:
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 0
    assert "Commands:" in result.output
    assert "guix-image build --example -o example.tar" in result.output


def test_common_options_work_before_and_after_the_command(workspace: Path) -> None:
    archive = str(workspace / "app.tar")
    for args in (
        ["-q", "--no-color", "inspect", archive],
        ["inspect", archive, "-q", "--no-color"],
    ):
        result = CliRunner().invoke(main, args)
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


def test_quiet_and_verbose_on_build(store: StoreTree, tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(store.config([[store.item("q", {"f": "1"})]])))
    quiet = CliRunner().invoke(main, ["build", str(config), "-o", str(tmp_path / "o.tar"), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    verbose = CliRunner().invoke(
        main, ["build", str(config), "-o", str(tmp_path / "o.tar"), "-v", "--no-cache"]
    )
    assert "layer 1: sha256:" in verbose.stderr and "(hashed)" in verbose.stderr
    again = CliRunner().invoke(main, ["-v", "build", str(config), "-o", str(tmp_path / "o.tar")])
    assert "(cached digest confirmed" in again.stderr


def on_a_terminal(command: list[str], env: dict[str, str] | None = None) -> str:
    """What `command` prints with stdout on a pseudo-terminal."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    process.wait(timeout=60)
    return b"".join(chunks).decode(errors="replace")


def test_colour_on_a_terminal_only_and_never_with_no_color(workspace: Path) -> None:
    command = [*GUIX_IMAGE, "verify", str(workspace / "app.tar")]
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    assert ANSI_COLOUR.search(on_a_terminal(command, env))
    assert not ANSI_COLOUR.search(on_a_terminal(command, {**env, "NO_COLOR": "1"}))
    assert not ANSI_COLOUR.search(on_a_terminal([*command, "--no-color"], env))
    piped = subprocess.run(command, capture_output=True, text=True, env=env)
    assert "\x1b[" not in piped.stdout
    assert piped.stdout.splitlines()[0] == "PASS  config digest"


def test_man_pages_match_the_commands() -> None:
    pages = all_pages(main)
    directory = TOP / "guix_image" / "man"
    assert sorted(p.name for p in directory.glob("*.1")) == sorted(pages)
    for name, page in pages.items():
        assert (directory / name).read_text() == page, (
            f"regenerate: python3 -m guix_image.manpage ({name})"
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
    store: StoreTree, build: BuildFn, tmp_path: Path
) -> None:
    # The console entry point ends with os._exit: whatever was written to
    # stdout and stderr must be out by then, and the exit code kept.
    many = store.item("many", {f"file-{i:05d}": str(i) for i in range(3000)})
    archive, _ = build(store.config([[many]]))
    expected = CliRunner().invoke(main, ["inspect", str(archive), "--files", "--json"])
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
        [*GUIX_IMAGE, "verify", str(tmp_path / "broken.tar")], capture_output=True
    )
    assert failed.returncode == 2
    assert failed.stdout == b""
    assert "truncated archive" in failed.stderr.decode()
    assert failed.stderr.decode().count("\n") == 1
