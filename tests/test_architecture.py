"""The package layout's rules (issue 24), read from the source with :mod:`ast`.

- no import cycle among the project's modules, counting every import, also one inside a
  function (a deferred import hides a cycle, it does not remove it);
- no first-party import inside a function, except the optional dependencies' modules
  listed in ``DEFERRED`` (wandb, tensorboard and submitit are imported where they are used);
- the layers: ``fam`` (explainer core) <- ``baselines`` <- ``evaluation`` (metrics, their
  registry, statistics, then ``evaluation.reporting``) <- ``experiments``; a lower layer
  never imports a higher one, and the metrics never import the reporting package;
- no module over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fam", "baselines", "evaluation", "experiments", "benchmarks")
#: lower layers first: a module may import its own layer and those before it
LAYERS = ("fam", "baselines", "evaluation", "evaluation.reporting", "experiments", "benchmarks")
#: first-party modules that may be imported inside a function (none today)
DEFERRED: set[tuple[str, str]] = set()
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` of every first-party import."""
    tree = ast.parse(path.read_text(), str(path))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules) if target.split(".")[0] in PACKAGES else None
            if resolved and resolved != name:
                out.append((resolved, node.lineno, id(node) in inside))
    return out


IMPORTS = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    return max(i for i, layer in enumerate(LAYERS) if f"{module}.".startswith(f"{layer}."))


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def _graph(imports: dict[str, list[tuple[str, int, bool]]]) -> dict[str, list[str]]:
    return {name: sorted({t for t, _, _ in found}) for name, found in imports.items()}


def test_no_import_cycle_among_the_project_modules():
    cycles = _cycles(_graph(IMPORTS))
    assert not cycles, f"import cycles: {cycles}"


def test_no_first_party_import_inside_a_function():
    deferred = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name, found in IMPORTS.items()
        for target, line, inner in found
        if inner and (name, target) not in DEFERRED
    ]
    assert not deferred, "imports inside functions:\n" + "\n".join(sorted(set(deferred)))


def test_lower_layers_never_import_higher_ones():
    wrong = [
        f"{name} imports {target}"
        for name, found in IMPORTS.items()
        for target, _, _ in found
        if _layer(target) > _layer(name)
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines"


def test_the_checks_see_a_planted_cycle_and_a_deferred_import(tmp_path):
    """The reader is not blind: in a toy tree it finds the in-function import and the
    cycle that the deferral hides."""
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "__init__.py").write_text("")
    (tmp_path / "fam" / "a.py").write_text("from fam import b\n")
    (tmp_path / "fam" / "b.py").write_text("def f():\n    from .a import x\n")
    modules = {"fam": "__init__", "fam.a": "a", "fam.b": "b"}
    modules = {k: tmp_path / "fam" / f"{v}.py" for k, v in modules.items()}
    found = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert found == {"fam": [], "fam.a": [("fam.b", 1, False)], "fam.b": [("fam.a", 2, True)]}
    assert _cycles(_graph(found)) == [["fam.a", "fam.b"]]
