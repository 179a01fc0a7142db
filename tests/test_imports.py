"""The package's import graph, read from the source (no imports run): no cycles between modules, function-local
imports included, and a function-local import only where it defers a heavy dependency.

An edge goes from a module to each module it imports, at module level or inside a function: `from P import x`
is an edge to `P`, and to `P.x` when that is a module; `import P.x` is an edge to `P.x` alone (a package's
`__init__` that re-exports its own modules is its facade: a sibling is imported as `import P.x as x`).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import refusal_edit

PACKAGE = Path(refusal_edit.__file__).parent
# What a deferred import is for: libraries that take seconds to import (the command line registers every command
# at start-up, and `import refusal_edit` stays fast), or that are optional.
HEAVY = {
    "accelerate",
    "gguf",
    "huggingface_hub",
    "jinja2",
    "llama_cpp",
    "matplotlib",
    "numpy",
    "optuna",
    "peft",
    "safetensors",
    "scipy",
    "torch",
    "transformers",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    # `from P import x` reads P's namespace first (its `__init__` runs, and x may be a name there): an edge to P,
    # and to P.x when that is a module.
    return [base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)]


def _known(name: str) -> str | None:
    """The module of ours an imported name belongs to (`refusal_edit.x.y`), or None for a library."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name if name in MODULES else None


@cache
def _imports() -> list[tuple[str, int, str, bool]]:
    """(importer, line, imported name, inside a function) for every import statement of the package."""
    found = []
    for module, path in MODULES.items():

        def visit(node: ast.AST, local: bool, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                if isinstance(child, ast.Import | ast.ImportFrom):
                    found.extend((module, child.lineno, t, local) for t in _targets(module, child))
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, rest = work[-1]
            nxt = next(rest, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, _, name, _ in _imports():
        target = _known(name)
        if target is not None and target != module:
            edges[module].add(target)
    return edges


@cache
def _heavy(module: str) -> str | None:
    """The heavy library a module imports at module level, itself or through our modules (None: light)."""
    for importer, _, name, local in _imports():
        if importer != module or local:
            continue
        if name.split(".")[0] in HEAVY:
            return name
        target = _known(name)
        if target is not None and target != module and not module.startswith(f"{target}."):
            via = _heavy(target)
            if via is not None:
                return f"{target} -> {via}"
    return None


def _deferred(importer: str, target: str) -> str | None:
    """What importing `target` from `importer` loads that is heavy: the module itself, or a package of it that
    the importer is not already inside (its `__init__` runs first)."""
    parts = target.split(".")
    for package in (".".join(parts[:i]) for i in range(len(parts), 0, -1)):
        if package in MODULES and not importer.startswith(f"{package}.") and importer != package:
            heavy = _heavy(package)
            if heavy is not None:
                return heavy
    return None


def test_the_checker_sees_a_cycle_and_a_local_import():
    """The scanner itself: a cycle made by a function-local import is found, and so is a light local import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert any(local for *_, local in _imports()) and _heavy("refusal_edit.edits.plan") is not None
    assert _heavy("refusal_edit.errors") is None


def test_no_import_cycles_between_modules():
    """Each module can be read, tested and moved on its own only if no import path leads back to it."""
    assert _cycles(_graph()) == []


def test_function_local_imports_only_defer_heavy_modules():
    """A function-local import of our own code defers a module that pulls in a heavy library; one of a light
    module only hides a dependency (or a cycle), so it belongs at the top of the file."""
    light = [
        f"{module}:{line} {name}"
        for module, line, name, local in _imports()
        if local and _known(name) is not None and _deferred(module, _known(name)) is None
    ]
    assert light == []


# Where the fields of an addition may be spelled out one by one: the value itself, the record that stores it,
# the options that declare them and the one function that reads them into the value, the hook primitive.
EDIT_FIELDS = {"mode", "coeff", "layer", "site", "unit"}
SPELLED_OUT = {
    "edits.spec.EditSpec",
    "checkpoint.record.EditRecord",
    "cli.chat.chat",
    "cli.evaluate.evaluate",
    "cli.orthogonalize.orthogonalize",
    "workflows.planning.edit_from_options",
    "interventions.addition",
}


def test_an_edit_is_one_value_from_the_options_to_the_writers_and_hooks():
    """`EditSpec` is the one description of an edit: no other class declares its addition fields, and no
    function takes three or more of them as loose parameters (a parallel description of the edit, issue #30)."""
    found = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and hasattr(s.target, "id")}
            elif isinstance(node, ast.FunctionDef):
                names = {a.arg for a in [*node.args.args, *node.args.kwonlyargs]}
            else:
                continue
            if len(names & EDIT_FIELDS) >= 3:
                found.add(f"{module.removeprefix('refusal_edit.')}.{node.name}")
    assert found == SPELLED_OUT


if __name__ == "__main__":  # `python tests/test_imports.py`: the figures issue #30 reports
    for component in _cycles(_graph()):
        print(len(component), " ".join(m.removeprefix("refusal_edit.") for m in component))
    local = {(module, line) for module, line, name, inner in _imports() if inner and _known(name) is not None}
    print(f"function-local import statements of our own modules: {len(local)}")
