"""The house rules of docs/architecture.md, read from the source so they cannot rot.

Every module of the package is parsed with ``ast`` (nothing is imported), and its imports
are checked against the layers: arrows point down (``supervision`` knows neither the API
nor the tasks; the tasks reach processes only through the control API), the API uses
``supervision`` through the package's public names, ``ocp-agentctl`` stays standard-library
only, ``aiohttp.web`` belongs to ``api/``, and ``daemon.py`` alone wires the parts
together.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ocp_agentd"


@dataclass(frozen=True)
class Import:
    """One imported module (``target``), and for ``from target import name``, the name."""

    module: str  # the importing module, e.g. "ocp_agentd.api.streams"
    target: str  # the module named by the statement, e.g. "ocp_agentd.supervision"
    name: str | None  # the imported name for "from ... import name", else None
    line: int
    typing_only: bool  # under "if TYPE_CHECKING:" (no import at run time)

    def __str__(self) -> str:
        what = f"from {self.target} import {self.name}" if self.name else f"import {self.target}"
        return f"{self.module}:{self.line}: {what}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(module: str, path: Path, tree: ast.AST) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, None, child.lineno, typing_only)
                             for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join([*base, target] if target else base)
                found.extend(Import(module, target, alias.name, child.lineno, typing_only)
                             for alias in child.names)
            visit(child, typing_only or (isinstance(child, ast.If)
                                         and _is_type_checking(child)))

    visit(tree, False)
    return found


def _load() -> tuple[dict[str, ast.Module], list[Import]]:
    trees: dict[str, ast.Module] = {}
    imports: list[Import] = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        trees[module] = tree
        imports.extend(_imports_of(module, path, tree))
    return trees, imports


TREES, IMPORTS = _load()


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _reaches(imp: Import, package: str) -> bool:
    """Whether the statement imports ``package`` or one of its modules (a ``from`` import
    of a submodule counts: ``from ocp_agentd import api`` reaches ``ocp_agentd.api``)."""
    full = f"{imp.target}.{imp.name}" if imp.name else imp.target
    return _within(imp.target, package) or _within(full, package)


def _violations(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return [str(imp) for imp in IMPORTS
            if _within(imp.module, importer)
            and any(_reaches(imp, package) for package in forbidden)]


def _public_names(package: str) -> set[str]:
    for node in TREES[package].body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{package} declares no __all__")


def test_the_walk_sees_the_package() -> None:
    """The checks below are only as good as the walk: it must find the known edges."""
    assert {"ocp_agentd.daemon", "ocp_agentd.supervision.program",
            "ocp_agentd.api.app", "ocp_agentd.tasks.engine"} <= TREES.keys()
    edges = {(imp.module, imp.target) for imp in IMPORTS}
    assert ("ocp_agentd.daemon", "ocp_agentd.supervision") in edges
    assert ("ocp_agentd.api.context", "ocp_agentd.supervision") in edges
    assert any(imp.typing_only for imp in IMPORTS if imp.module == "ocp_agentd.tasks.base")


def test_the_walk_resolves_relative_and_typing_only_imports() -> None:
    source = ("from typing import TYPE_CHECKING\n"
              "from ..api import app\n"
              "if TYPE_CHECKING:\n"
              "    from .types import State\n"
              "def late():\n"
              "    import ocp_agentd.tasks.engine\n")
    path = PACKAGE_DIR / "supervision" / "example.py"
    found = _imports_of("ocp_agentd.supervision.example", path, ast.parse(source))
    assert [(i.target, i.name, i.typing_only) for i in found] == [
        ("typing", "TYPE_CHECKING", False),
        ("ocp_agentd.api", "app", False),
        ("ocp_agentd.supervision.types", "State", True),
        ("ocp_agentd.tasks.engine", None, False),
    ]
    assert _reaches(found[1], "ocp_agentd.api") and _reaches(found[3], "ocp_agentd.tasks")
    assert not _reaches(found[2], "ocp_agentd.api")


@pytest.mark.parametrize(("layer", "forbidden"), [
    # The heart knows processes, nothing of HTTP routes, tasks or the command line.
    ("ocp_agentd.supervision", ("ocp_agentd.api", "ocp_agentd.tasks", "ocp_agentd.client",
                                "ocp_agentd.cli", "ocp_agentd.daemon")),
    # The task engine could run in another process: it reaches processes only through
    # AgentClient, as a remote caller would.
    ("ocp_agentd.tasks", ("ocp_agentd.api", "ocp_agentd.supervision", "ocp_agentd.cli",
                          "ocp_agentd.daemon")),
    ("ocp_agentd.api", ("ocp_agentd.daemon", "ocp_agentd.cli", "ocp_agentd.client")),
    ("ocp_agentd.client", ("ocp_agentd.api", "ocp_agentd.supervision", "ocp_agentd.tasks",
                           "ocp_agentd.daemon")),
    ("ocp_agentd.config", ("ocp_agentd.api", "ocp_agentd.supervision", "ocp_agentd.tasks",
                           "ocp_agentd.daemon")),
])
def test_arrows_point_down(layer: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(layer, forbidden) == []


def test_api_uses_supervision_through_its_public_names() -> None:
    """``from ocp_agentd.supervision import X`` with X in the package's ``__all__``; never a
    module inside it (``ocp_agentd.supervision.program``), whose names may move."""
    public = _public_names("ocp_agentd.supervision")
    wrong = [str(imp) for imp in IMPORTS
             if _within(imp.module, "ocp_agentd.api") and _reaches(imp, "ocp_agentd.supervision")
             and (imp.target != "ocp_agentd.supervision" or imp.name not in public)]
    assert wrong == []


def test_only_the_daemon_imports_the_daemon() -> None:
    """``__main__`` runs it; cli/docs.py reads its argument parser to write its man page."""
    importers = {imp.module for imp in IMPORTS if _reaches(imp, "ocp_agentd.daemon")}
    assert importers <= {"ocp_agentd.__main__", "ocp_agentd.cli.docs"}


# The parts only daemon.py puts together (a test may build them; the package may not).
WIRED_PARTS = {"Supervisor", "TaskEngine", "AppContext", "create_app", "start_api",
               "AgentClient"}


def test_daemon_alone_wires() -> None:
    calls = [f"{module}:{node.lineno}: {node.func.id}()"
             for module, tree in TREES.items() if module != "ocp_agentd.daemon"
             for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id in WIRED_PARTS]
    assert calls == []
    daemon_calls = {node.func.id for node in ast.walk(TREES["ocp_agentd.daemon"])
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert daemon_calls >= WIRED_PARTS


def test_aiohttp_web_is_imported_at_run_time_only_by_the_api() -> None:
    wrong = [str(imp) for imp in IMPORTS
             if not imp.typing_only and not _within(imp.module, "ocp_agentd.api")
             and _reaches(imp, "aiohttp.web")]
    assert wrong == []


def test_the_command_line_stays_standard_library() -> None:
    """ocp-agentctl answers fast because it imports neither aiohttp, pydantic nor the
    daemon's modules (cli/docs.py, the man page generator, is a build step)."""
    wrong = [str(imp) for imp in IMPORTS
             if _within(imp.module, "ocp_agentd.cli") and imp.module != "ocp_agentd.cli.docs"
             and not imp.typing_only
             and not (imp.target.split(".")[0] in sys.stdlib_module_names
                      or _within(imp.target, "ocp_agentd.cli")
                      or (imp.target == "ocp_agentd" and imp.name in ("__version__", "cli")))]
    assert wrong == []


DOC = PACKAGE_DIR.parent / "docs" / "architecture.md"


def _documented_modules() -> set[str]:
    """The module map of docs/architecture.md (its first code block) as paths relative to
    the package: ``  name.py`` at the top, ``    name.py`` inside the last ``  dir/``."""
    block = DOC.read_text(encoding="utf-8").split("```")[1]
    found: set[str] = set()
    folder = ""
    for line in block.splitlines():
        entry = line.split()[0] if line.strip() else ""
        if line.startswith("  ") and not line.startswith("   ") and entry.endswith("/"):
            folder = entry
        elif line.startswith("    ") and not line.startswith("     ") and entry.endswith(".py"):
            found.add(folder + entry)
        elif line.startswith("  ") and not line.startswith("   ") and entry.endswith(".py"):
            found.add(entry)
    return found


def test_the_module_map_names_every_module() -> None:
    """Every module of the package has its line in docs/architecture.md, and the map names
    no module that is gone (cli/ and demo/ are described as a whole)."""
    modules = {str(path.relative_to(PACKAGE_DIR)) for path in PACKAGE_DIR.rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py")
               and path.relative_to(PACKAGE_DIR).parts[0] not in ("cli", "demo")}
    assert _documented_modules() == modules
