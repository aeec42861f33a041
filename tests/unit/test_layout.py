"""The package's rooms and who may enter them: read from the import statements of the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest_kipik

PACKAGE = Path(pytest_kipik.__file__).parent

#: The ground floor: everything may use it, it uses nothing above it but the pure builders
#: that validating the settings needs.
GROUND = {
    "config",
    "errors",
    "labels",
    "parsing",
    "paths",
    "process",
    "progress",
    "signals",
    "waiting",
}
PURE = {"kind.config", "kind.kubelet", "kind.registries", "hosts.pod_manifest"}
#: The backends' implementations: only the chooser (and the other parts of hosts/) know them.
IMPLEMENTATIONS = {
    "hosts.docker",
    "hosts.docker_host",
    "hosts.pod",
    "hosts.pod_host",
    "hosts.pod_api",
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (not for type checking)."""
    found: dict[str, set[str]] = {}
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []  # typing only: no runtime edge
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_kipik"):
                base = (node.module or "").removeprefix("pytest_kipik").lstrip(".")
                for alias in node.names:
                    child = f"{base}.{alias.name}".lstrip(".")
                    names.add(child if child in modules else base)
        found[_module(path)] = {n for n in names if n and n != _module(path)}
    return found


def test_the_package_has_no_import_cycles() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, " -> ".join((*trail, module))
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_the_ground_floor_imports_nothing_above_it() -> None:
    graph = _imports()
    for module in GROUND | PURE:
        assert graph[module] <= GROUND | PURE, (module, graph[module] - GROUND - PURE)


def test_only_the_hosts_rooms_know_which_backend_is_which() -> None:
    graph = _imports()
    for module, imported in graph.items():
        if not module.startswith("hosts."):
            assert not imported & IMPLEMENTATIONS, (module, imported & IMPLEMENTATIONS)
    for pod in ("hosts.pod", "hosts.pod_host", "hosts.pod_api"):
        assert "hosts.docker" not in graph[pod]  # the engine module serves both


def test_each_folder_says_what_it_holds() -> None:
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        if init.exists():
            assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), folder


#: Declarative tables, long on purpose: one entry per line, no logic.
DECLARATIVE = {"cli.build_parser"}


def test_no_module_and_no_function_is_too_long_to_read() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 500, (path.name, len(text.splitlines()))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if f"{_module(path)}.{node.name}" in DECLARATIVE:
                    continue
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 60, (_module(path), node.name, length)
