"""README.md, CHANGELOG.md and .ci/run stay true to each other."""

from __future__ import annotations

import re
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    readme = (TOP / "README.md").read_text()
    match = re.search(r"<!-- test-command[^>]*-->\s*```sh\n(.+?)\n```", readme)
    assert match, "README.md must mark its test command"
    return match.group(1)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (TOP / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == readme_test_command()


def test_quick_start_installs_and_builds_the_example() -> None:
    readme = (TOP / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    first_command = re.search(r"```sh\n(.+?)\n```", quick_start)
    assert first_command
    assert first_command.group(1) == "pip install . && guix-image build --example -o example.tar"


def test_changelog_follows_keep_a_changelog() -> None:
    changelog = (TOP / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog")
    assert "## [Unreleased]" in changelog
    assert "keepachangelog.com" in changelog
