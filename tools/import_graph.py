"""Print the package's internal import graph and its cycles (module-level and lazy).

    python tools/import_graph.py            # the graph, one line per module, then cycles
    python tools/import_graph.py --check    # exit 1 if any cycle exists

An edge ``a -> b`` is an ``import``/``from ... import`` of ``easyedit_replay.b`` anywhere in
``a`` (at module level or inside a function: a lazy import that closes a circle is still
a circle for a reader). Read with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = "easyedit_replay"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_pkg: bool, node: ast.ImportFrom) -> List[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = current.split(".")
        keep = len(parts) - node.level + (1 if is_pkg else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    out = [base]
    for alias in node.names:  # "from . import x" may import a submodule
        out.append(f"{base}.{alias.name}")
    return out


def graph() -> Dict[str, Set[str]]:
    files = sorted(p for p in ROOT.rglob("*.py"))
    modules = {module_name(p): p for p in files}
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = resolve(name, is_pkg, node)
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    edges[name].add(t)
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
    p.add_argument("--check", action="store_true", help="exit 1 when there is a cycle")
    args = p.parse_args(argv)
    edges = graph()
    short = lambda m: m[len(PACKAGE) + 1:] or PACKAGE  # noqa: E731
    for m in sorted(edges):
        print(f"{short(m)} -> {', '.join(sorted(short(t) for t in edges[m])) or '-'}")
    found = cycles(edges)
    print(f"\n{len(found)} cycle(s)" + "".join(f"\n  {' <-> '.join(short(m) for m in c)}" for c in found))
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
