"""Print the package's internal import graph and its cycles, at module level and at call time.

    python scripts/import_graph.py            # the graph, one line per module, then cycles
    python scripts/import_graph.py --check    # exit 1 if any cycle exists at either level

An edge ``a -> b`` is an ``import``/``from ... import`` of ``easyedit_replay.b`` in ``a``.
Module-level edges run when ``a`` is imported (class bodies included); function-level
edges run when a function of ``a`` is called (a lazy import). Two graphs are checked: the
module-level graph (import time) and the union of both (call time: a lazy import that
closes a circle is still a circle for a reader). ``from . import x`` is an edge to the
submodule ``x`` when there is one and to the package itself (its ``__init__``) when ``x``
is a name defined there. Read with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

PACKAGE = "easyedit_replay"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LEVELS = ("module", "function")


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_pkg: bool, node: ast.ImportFrom, modules) -> List[str]:
    """The modules a ``from ... import`` reads: each imported name's submodule when it is one,
    else the module it is imported from."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = current.split(".")
        keep = len(parts) - node.level + (1 if is_pkg else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _imports(tree: ast.AST, in_function: bool = False) -> Iterator[Tuple[ast.AST, bool]]:
    """Every import node of ``tree`` with whether it sits inside a function body."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(child, inner)


def graph(level: str = "all", root: Path = ROOT) -> Dict[str, Set[str]]:
    """``{module: imported modules}`` of the package at ``root`` for ``level`` ``"module"``
    (import time), ``"function"`` (imports inside functions) or ``"all"`` (both: the
    call-time graph)."""
    if level not in LEVELS + ("all",):
        raise ValueError(f"level={level!r}; use one of {LEVELS + ('all',)}")
    files = sorted(p for p in root.rglob("*.py"))
    modules = {module_name(p, root): p for p in files}
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node, in_function in _imports(tree):
            if level != "all" and level != LEVELS[in_function]:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                targets = resolve(name, is_pkg, node, modules)
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when there is a cycle at either level")
    args = p.parse_args(argv)
    at_import, in_functions, at_call = graph("module"), graph("function"), graph("all")
    short = lambda m: m[len(PACKAGE) + 1:] or PACKAGE  # noqa: E731
    names = lambda ms: ", ".join(sorted(short(t) for t in ms)) or "-"  # noqa: E731
    for m in sorted(at_call):
        lazy = in_functions[m] - at_import[m]
        print(f"{short(m)} -> {names(at_import[m])}" + (f"  (in functions: {names(lazy)})" if lazy else ""))
    found = 0
    for what, edges in (("module-level", at_import), ("call-time (module- and function-level)", at_call)):
        comps = cycles(edges)
        found += len(comps)
        print(f"\n{what}: {len(comps)} cycle(s)" + "".join(f"\n  {' <-> '.join(short(m) for m in c)}" for c in comps))
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
