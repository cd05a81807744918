"""Guard rails: the package's layout is its architecture, and stays so.

Every import in the package, lazy ones inside functions and type-only ones
included, goes downwards through the layers below: a package imports its
own modules and those of lower layers, never a sibling or a higher layer,
and no module imports its way back to itself.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "guix_image"
TESTS = ROOT / "tests"

# Lower numbers first. Packages of one layer do not import each other.
LAYERS = {
    "guix_image": 0,  # the version
    "guix_image.errors": 0,
    "guix_image.model": 1,
    "guix_image.spill": 1,
    "guix_image.tar": 2,
    "guix_image.fastpath": 3,
    "guix_image.store": 3,
    "guix_image.formats": 4,
    "guix_image.analysis": 5,
    "guix_image.build": 5,
    "guix_image.registry": 5,
    "guix_image.cli": 6,
    "guix_image.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The guix_image modules `name` imports, anywhere in its code."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {module for module in found if module in MODULES}


def third_party(name: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def layer_of(module: str) -> str:
    """The layer (a key of LAYERS) a guix_image module belongs to, or ""."""
    while module and module not in LAYERS:
        module = module.rpartition(".")[0]
    return module


def test_every_module_has_a_layer() -> None:
    assert "guix_image.cli.app" in MODULES and len(MODULES) > 40
    for name in MODULES:
        assert layer_of(name) in LAYERS, f"{name} is in no layer"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_downwards(name: str) -> None:
    mine = layer_of(name)
    for imported in imports(name):
        theirs = layer_of(imported)
        if theirs == mine:
            continue
        assert LAYERS[theirs] < LAYERS[mine], f"{name} imports {imported}: not below {mine}"


def test_no_module_imports_its_way_back_to_itself() -> None:
    graph = {name: imports(name) - {name} for name in MODULES}
    # A package's __init__ is imported with any of its modules: an edge to it is
    # only a circle if the __init__ itself imports back.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_only_the_cli_imports_click_or_rich() -> None:
    for name in MODULES:
        if layer_of(name) in ("guix_image.cli", "guix_image.__main__"):
            continue
        assert not third_party(name) & {"click", "rich"}, f"{name} imports click or rich"


@pytest.mark.parametrize("package", ["guix_image.formats", "guix_image.analysis"])
def test_readers_never_reach_into_the_build_or_the_speed_machinery(package: str) -> None:
    for name in MODULES:
        if layer_of(name) != package:
            continue
        for imported in imports(name):
            assert layer_of(imported) != "guix_image.build", f"{name} imports {imported}"
            if layer_of(imported) == "guix_image.fastpath":
                # Only the documented interface, the package itself.
                assert imported == "guix_image.fastpath", f"{name} imports {imported}"


def test_the_readme_module_map_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Module map") :]
    for path in MODULES.values():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        relative = path.relative_to(PACKAGE).as_posix()
        assert f"`{relative}`" in section, f"README.md's module map does not name {relative}"
    for package in {layer_of(name) for name in MODULES} - {"guix_image", "guix_image.errors"}:
        short = package.removeprefix("guix_image.")
        if "." not in short and (PACKAGE / short).is_dir():
            assert f"`{short}/`" in section, f"README.md's module map does not name {short}/"


def test_no_test_module_imports_another() -> None:
    for path in [*sorted(TESTS.glob("test_*.py")), TESTS / "conftest.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                module = node.module or ""
                only_support = module == "" and all(alias.name == "support" for alias in node.names)
                assert module.startswith("support") or only_support, f"{path.name}: .{module}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                assert node.module.startswith("tests.support"), f"{path.name}: {node.module}"


def test_help_imports_nothing_heavy() -> None:
    """`--help` (and completion) start fast: the core and rich are imported lazily."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "guix_image", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    imported = set(re.findall(r"\|\s+([\w.]+)\n", result.stderr))
    assert "guix_image.cli.app" in imported
    core = ("guix_image.build", "guix_image.formats", "guix_image.analysis", "guix_image.fastpath")
    heavy = {name for name in imported if name.split(".")[0] == "rich" or layer_of(name) in core}
    assert heavy == set()


def test_the_wheel_holds_every_module_and_the_man_pages(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = tmp_path.glob("guix_image-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {path.relative_to(ROOT).as_posix() for path in MODULES.values()}
    expected |= {path.relative_to(ROOT).as_posix() for path in (PACKAGE / "man").glob("*.1")}
    assert len(expected) > 45
    assert expected - names == set()
