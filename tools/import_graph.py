"""The import graph of the ``vtp`` package, read from the source (nothing is imported).

    python tools/import_graph.py          # prints module -> project modules it imports

Exits with status 1, naming the culprits, when the layout's rules are broken: the library
(``vtp`` outside ``vtp.app``) imports the application, ``vtp_kernels`` imports ``vtp``, the
graph has a cycle, or a function imports a project module (which hides a dependency from
the top of its file).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("vtp", "vtp_kernels")


def _module_name(path: Path) -> Tuple[str, str]:
    """(module, package it resolves relative imports against)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def _targets(node: ast.AST, package: str) -> List[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if not node.level:
            return [node.module or ""]
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        if node.module:
            return [".".join(base + [node.module])]
        return [".".join(base + [a.name]) for a in node.names]
    return []


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT


def import_graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """({module: project modules it imports}, imports found inside functions)."""
    graph: Dict[str, Set[str]] = {}
    inner: List[str] = []
    for path in sorted(p for package in PROJECT for p in (ROOT / package).rglob("*.py")):
        module, pkg = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {t for node in ast.walk(tree) for t in _targets(node, pkg) if _is_project(t)}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if any(_is_project(t) for t in _targets(node, pkg)):
                        inner.append(f"{module}.{fn.name}: {ast.unparse(node)}")
    return graph, inner


def _resolve(name: str, graph: Dict[str, Set[str]]) -> str:
    """A `from pkg import module` target names the module itself when it is one."""
    while name not in graph and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    edges = {m: {_resolve(d, graph) for d in deps if _resolve(d, graph) in graph} - {m}
             for m, deps in graph.items()}
    # A package's __init__ importing its own submodules is how a package exports them.
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in edges.items()}
    found, state = [], {}

    def visit(m: str, stack: List[str]) -> None:
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(graph: Dict[str, Set[str]] = None, inner: List[str] = None) -> List[str]:
    """What breaks the layout's rules in ``graph`` and ``inner`` (default: this checkout's)."""
    if graph is None:
        graph, inner = import_graph()
    inner = inner or []
    out = [f"library module {m} imports the application ({d})"
           for m, deps in sorted(graph.items()) if _within(m, "vtp") and not _within(m, "vtp.app")
           for d in sorted(deps) if _within(d, "vtp.app")]
    out += [f"kernel module {m} imports the model library ({d})"
            for m, deps in sorted(graph.items()) if _within(m, "vtp_kernels")
            for d in sorted(deps) if _within(d, "vtp")]
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    out += [f"import inside a function: {i}" for i in inner]
    return out


def main() -> int:
    graph, _ = import_graph()
    for module, deps in sorted(graph.items()):
        shown = sorted({_resolve(d, graph) for d in deps} - {module})
        print(f"{module:24s} -> {', '.join(shown)}")
    problems = violations()
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
