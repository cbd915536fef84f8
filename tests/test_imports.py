"""The import graph of ``src/tunelab`` has no circles (DESIGN.md: arrows point down).

Every module under ``src/tunelab`` is parsed (``ast``, no import side effects). An edge ``A -> B``
is an ``import``/``from ... import`` in ``A`` of a ``tunelab`` module ``B``: ``from tunelab.x import y``
points at ``tunelab.x.y`` when that is a module, else at ``tunelab.x``. Edges to a module's own
parent packages are not added (Python imports them first anyway, and a package's ``__init__``
re-exporting its submodules is not a circle).

- Module-level imports (including those in class bodies and ``try``/``if`` blocks; not those under
  ``if TYPE_CHECKING:``) form the graph that must be acyclic.
- A function-level import is a *late import*. Within ``tunelab.tuners`` a late import may not point
  at a module that already reaches the importer at module level: that is a circle dodged, not removed.

The checks are generic, so modules added anywhere are covered without editing this file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tunelab"
NO_LATE_DODGES = ("tunelab.tuners",)  # packages whose late imports must not close a circle


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported tunelab module
    line: int
    late: bool  # inside a function body


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """``(node, late)`` for every import statement; skips ``if TYPE_CHECKING:`` bodies."""
    def visit(node: ast.AST, late: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, late
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from visit(other, late)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, True)
            else:
                yield from visit(child, late)
    yield from visit(tree, False)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node, late in _import_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            resolved = _resolve(target, modules)
            if resolved is None or resolved == module or module.startswith(resolved + "."):
                continue  # itself, or a parent package (imported first anyway)
            found.append(Import(module, resolved, node.lineno, late))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[Import]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    late = []
    for name, path in modules.items():
        for edge in imports_of(name, path, modules):
            if edge.late:
                late.append(edge)
            else:
                graph[name].add(edge.target)
    return graph, late


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or None (iterative DFS, colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child, 2) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A module-level import path ``start -> ... -> goal``, or None."""
    seen, frontier = {start: [start]}, [start]
    while frontier:
        node = frontier.pop()
        for child in sorted(graph.get(node, ())):
            if child not in seen:
                seen[child] = seen[node] + [child]
                if child == goal:
                    return seen[child]
                frontier.append(child)
    return None


def test_the_walker_sees_the_package() -> None:
    graph, _ = import_graph()
    assert {"tunelab.tuners.core", "tunelab.tuners.registry", "tunelab.tuners.lora.lora"} <= set(graph)
    assert "tunelab.tuners.registry" in graph["tunelab.tuners.core"]
    assert "tunelab.tuners.lora.lora" in graph["tunelab.tuners.lora.dora"]


def test_find_cycle_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_level_import_cycle() -> None:
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", NO_LATE_DODGES)
def test_no_late_import_dodges_a_cycle(package: str) -> None:
    graph, late = import_graph()
    dodges = []
    for edge in late:
        if edge.source == package or edge.source.startswith(package + "."):
            back = reaches(graph, edge.target, edge.source)
            if back:
                dodges.append(f"{edge.source}:{edge.line} imports {edge.target} inside a function, but "
                              + " -> ".join(back) + " at module level")
    assert not dodges, "late imports that dodge a circle:\n" + "\n".join(dodges)


def test_tuners_do_not_import_multimodal() -> None:
    graph, late = import_graph()
    edges = [(source, target) for source, targets in graph.items() for target in targets]
    edges += [(edge.source, edge.target) for edge in late]
    wrong = [f"{source} -> {target}" for source, target in edges
             if source.startswith("tunelab.tuners") and target.startswith("tunelab.multimodal")]
    assert not wrong, "tuners/ must not import multimodal/: " + ", ".join(wrong)
