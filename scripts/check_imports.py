#!/usr/bin/env python3
"""The package's import graph: no cycles, and the project's own modules imported at the top of files.

usage: python scripts/check_imports.py PKG_DIR   (make lint runs it on pipeline/)

A cycle counts imports anywhere in a file (a function-level import still ties two modules together).
A function-level import of one of the package's own modules is allowed only when its line says why,
with a trailing ``# lazy: <reason>`` comment (for a module that wraps a heavy optional package).
Exit 1 when a cycle exists or an unexplained function-level import is found.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def imported(cur: str, is_pkg: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = cur.split(".") if is_pkg else cur.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def scan(root: Path):
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    lazy: list[str] = []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        top = set(id(n) for n in tree.body)
        for stmt in tree.body:  # imports under `if TYPE_CHECKING:` / try at module level are top level too
            if isinstance(stmt, (ast.If, ast.Try)):
                top.update(id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = {t for t in imported(name, path.name == "__init__.py", node) if t in mods and t != name}
            edges[name].update(targets)
            if targets and id(node) not in top and "# lazy:" not in lines[node.lineno - 1]:
                lazy.append(f"{path}:{node.lineno}: function-level import of {', '.join(sorted(targets))}")
    return edges, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
            # a package importing its own submodule (pipeline.x -> pipeline.x.y -> pipeline.x) is not a cycle
            real = [m for m in comp if not any(o != m and o.startswith(m + ".") for o in comp)]
            if len(real) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    edges, lazy = scan(Path(argv[0]).resolve())
    found = cycles(edges)
    for comp in found:
        print("import cycle: " + " <-> ".join(comp))
    for line in lazy:
        print(line)
    print(f"modules {len(edges)}, cycles {len(found)}, unexplained function-level imports {len(lazy)}")
    return 1 if found or lazy else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
