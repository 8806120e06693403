"""The project's import graph as the tests read it: every import of a project module, at the
top of a file or inside a function (a lazy import still makes the importer depend on it)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def project_imports(path: Path, packages: tuple[str, ...] = ("pipeline", "stages")) -> set[str]:
    """Modules of `packages` (repo-relative .py paths) that `path` imports, itself excluded."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            rel = name.replace(".", "/") + ".py"
            if name.split(".")[0] in packages and (REPO / rel).exists():
                out.add(rel)
    return out - {str(path.resolve().relative_to(REPO))}


def closure(start: str, packages: tuple[str, ...] = ("pipeline", "stages")) -> set[str]:
    """`start` (a repo-relative .py path) and every project module it reaches."""
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += project_imports(REPO / mod, packages)
    return seen
