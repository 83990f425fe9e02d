"""The import graph of ``normdrop`` runs one way: a module imports only from its own layer or lower ones, and no
set of modules imports itself round (lazy imports inside functions and ``TYPE_CHECKING`` blocks count too).

The layer order is written once, here, lowest first; ``docs/architecture.md`` explains it. A module belongs to the
first entry whose name is the module or a package above it. Run this file to see the offending edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "normdrop"

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "normdrop.nn",
        "normdrop.stats",
        "normdrop.seeds",
        "normdrop.tensors",
        "normdrop.versions",
        "normdrop.probe_catalog",
        "normdrop.layer_catalog",
        "normdrop.dataset_catalog",
        "normdrop.lr_search",
        "normdrop.selection",
        "normdrop.scope",
        "normdrop.significance",
    ),
    ("normdrop.data", "normdrop.models", "normdrop.spec"),
    ("normdrop.train", "normdrop.fleet", "normdrop.store"),
    ("normdrop.probes",),
    ("normdrop.lab", "normdrop.tracking", "normdrop.integrations"),
    ("normdrop.sweep",),
    ("normdrop.claims",),
    ("normdrop.study", "normdrop.ablation"),
    ("normdrop.report",),
    ("normdrop.bench",),
    ("normdrop.cli", "normdrop.playground"),
    ("normdrop",),
)
"""Lowest first: a module may import from its own layer and the ones listed before it, never from a later one.
``normdrop.fleet`` (batched training), ``normdrop.ablate`` and ``normdrop.playground`` have their places before they
exist, so the branches that add them land in the right layer. ``normdrop`` is the package's ``__init__``."""


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (top level, functions, ``TYPE_CHECKING``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one, else a name of ``pkg``.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import normdrop.nn.functional as F`` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of the first entry that is ``module`` or a package above it."""
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            if module == "normdrop" and "normdrop" not in layer:
                continue
            return index
    raise LookupError(f"module {module} is in no layer of LAYERS; add it to the layer it belongs to")


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The walker is not blind: an import inside a function, a TYPE_CHECKING block and a relative import count."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg import high\n")
    (package / "high.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .low import f\n")
    known = {"pkg", "pkg.low", "pkg.high"}
    assert imports_of("pkg.low", package / "low.py", known) == {"pkg.high"}
    assert imports_of("pkg.high", package / "high.py", known) == {"pkg.low"}
    assert find_cycles({"pkg.low": {"pkg.high"}, "pkg.high": {"pkg.low"}}) == [["pkg.high", "pkg.low"]]


def test_every_module_has_a_layer() -> None:
    for module in module_names():
        layer_of(module)


def test_imports_run_down_the_layers() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
