"""The two floors and their one direction, read from the source (``ast``, nothing imported).

* No import circle among Ebb's modules, ``TYPE_CHECKING`` and function-local imports
  included (a package's implicit import of its parents does not count).
* ``engine_runtime`` imports nothing of Ray or of ``deployments``.
* ``deployments`` imports no private module (``engine_runtime._x``,
  ``engine_runtime.x._y``) and from a module only names in its ``__all__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine_runtime", "deployments")


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


FILES = _module_files()


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> Ebb modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    graph: dict[str, set[str]] = {m: set() for m in FILES}
    for module, path in FILES.items():
        for target, names, _ in _imports(module, path):
            submodules = {f"{target}.{name}" for name in names} & FILES.keys()
            graph[module] |= submodules
            # ``from pkg import sub`` alone runs pkg's __init__ only as a parent, like any import.
            if target in FILES and (not names or len(submodules) < len(names)):
                graph[module].add(target)
        graph[module].discard(module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _all_of(module: str) -> set[str] | None:
    tree = ast.parse(FILES[module].read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return set(ast.literal_eval(node.value))
    return None


def test_the_walk_sees_the_tree():
    graph = _edges()
    assert "deployments.coordinator" in graph and "engine_runtime.memory.pool._lease_table" in graph
    assert "engine_runtime.memory._shm" in graph["engine_runtime.memory.budget"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_edges()) == []


@pytest.mark.parametrize("module", sorted(m for m in FILES if m.startswith("engine_runtime")))
def test_engine_runtime_knows_nothing_of_ray_or_deployments(module):
    bad = [(target, line) for target, _, line in _imports(module, FILES[module])
           if target.split(".")[0] in ("ray", "deployments")]
    assert bad == [], f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in FILES if m.startswith("deployments")))
def test_deployments_use_only_the_public_surface(module):
    problems = []
    for target, names, line in _imports(module, FILES[module]):
        if target.split(".")[0] != "engine_runtime":
            continue
        private = [p for p in target.split(".") if p.startswith("_")]
        if private:
            problems.append(f"line {line}: private module {target}")
            continue
        for name in names:
            if f"{target}.{name}" in FILES:
                if name.startswith("_"):
                    problems.append(f"line {line}: private module {target}.{name}")
                continue
            exported = _all_of(target) if target in FILES else None
            if exported is None:
                problems.append(f"line {line}: {target} has no __all__ (importing {name})")
            elif name not in exported:
                problems.append(f"line {line}: {name} is not in {target}.__all__")
    assert problems == [], f"{module}: " + "; ".join(problems)
