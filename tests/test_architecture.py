"""The package's layers: imports run one way, and there is no import cycle.

Layer order (a module may import from its own layer group or a lower rank only):

    cli
    workflows
    plotting
    evaluation, interpret
    executors
    models, targets
    data
    io, config
    errors

Modules of the same rank but different groups (``models`` and ``targets``; ``evaluation``
and ``interpret``; ``io`` and ``config``) must not import each other. Every import counts,
including those inside functions. ``executors`` (where units of work run: this process, Ray,
SLURM) sits below ``evaluation``, whose CV loop takes an executor, and above the models and
targets; only it imports Ray or submitit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dfrn"

RANK = {
    "errors": 0,
    "_exports": 0,
    "io": 1,
    "config": 1,
    "data": 2,
    "models": 3,
    "targets": 3,
    "executors": 4,
    "evaluation": 5,
    "interpret": 5,
    "plotting": 6,
    "workflows": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dfrn")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "dfrn":
                continue
            found.add(mod)
            for alias in node.names:  # "from dfrn.data import images" imports a module
                if (SRC.parent / Path(*mod.split("."), alias.name)).with_suffix(".py").exists():
                    found.add(f"{mod}.{alias.name}")
    found.discard(name)
    return found


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    unknown = sorted({_group(m) for m in MODULES} - set(RANK))
    assert not unknown, f"modules outside the layer table: {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module: str) -> None:
    group = _group(module)
    bad = []
    for target in sorted(GRAPH[module]):
        tgroup = _group(target)
        if target == "dfrn" or tgroup == group:
            continue
        if RANK[tgroup] >= RANK[group]:
            bad.append(f"{target} (layer {tgroup})")
    assert not bad, f"{module} (layer {group}) imports upward or sideways: {', '.join(bad)}"


def _third_party(path: Path) -> set[str]:
    """Top-level names of the non-dfrn packages a module imports (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {"dfrn"}


def test_only_the_executors_layer_imports_ray_or_submitit() -> None:
    """The cluster libraries stay in ``dfrn.executors``: the CV loops, permutations and
    workflows reach them through an executor only."""
    bad = sorted(f"{m} imports {lib}" for m, p in MODULES.items() if _group(m) != "executors"
                 for lib in _third_party(p) & {"ray", "submitit"})
    assert not bad, bad
    executors = [m for m in MODULES if _group(m) == "executors"]
    assert any("ray" in _third_party(MODULES[m]) for m in executors)  # the check sees them
    assert any("submitit" in _third_party(MODULES[m]) for m in executors)


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in GRAPH:
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_private_helpers_stay_in_their_subpackage() -> None:
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfrn"):
                if _group(node.module) == _group(module):
                    continue
                bad += [f"{module}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.endswith("__")]
    assert not bad, "private names imported across subpackages: " + "; ".join(bad)


@pytest.mark.parametrize("package", ["data", "targets", "models", "executors", "evaluation",
                                     "interpret", "workflows"])
def test_subpackages_re_export_their_public_names(package: str) -> None:
    import importlib

    pkg = importlib.import_module(f"dfrn.{package}")
    modules = [m for m in MODULES if m.startswith(f"dfrn.{package}.")]
    expected = set()
    for m in modules:
        expected.update(getattr(importlib.import_module(m), "__all__", []))
    assert set(pkg.__all__) == expected
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None


def test_every_module_states_its_responsibility() -> None:
    missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


#: The longest a function may be, docstring and decorators included: one screen.
MAX_FUNCTION_LINES = 60


def _long_functions(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                found.append((node.name, lines))
    return found


def test_the_length_rule_sees_a_long_function() -> None:
    short = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    method = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert _long_functions(ast.parse(f"@staticmethod\ndef f():\n{short}\n")) == [("f", 61)]
    assert _long_functions(ast.parse(f"def f():\n{short}\n")) == []  # 60 lines
    assert _long_functions(ast.parse(f"class A:\n    def g(self):\n{method}\n")) == [("g", 61)]


def test_every_function_fits_on_one_screen() -> None:
    """Every function in ``src/`` is at most 60 lines, docstring included."""
    long = [f"{m}.{name} ({n} lines)" for m, p in MODULES.items()
            for name, n in _long_functions(ast.parse(p.read_text(encoding="utf-8")))]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)
