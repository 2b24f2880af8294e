"""The packages' import graph: no loops inside training/, and bench/ imports nothing from tests/."""

import ast
from pathlib import Path

from tests.support import REPO


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_training_has_no_import_loops():
    modules = {f"training.{p.stem}": p for p in (REPO / "training").glob("*.py") if p.stem != "__init__"}
    graph = {name: sorted(imports(path) & modules.keys() - {name}) for name, path in modules.items()}
    loops = []

    def visit(name: str, trail: list[str]) -> None:
        for nxt in graph[name]:
            if nxt in trail:
                loops.append(trail[trail.index(nxt) :] + [nxt])
            elif len(trail) < len(graph):
                visit(nxt, trail + [nxt])

    for name in graph:
        visit(name, [name])
    assert not loops, loops[:3]


def test_bench_stands_on_its_own():
    offenders = {
        p.name: sorted(m for m in imports(p) if m.split(".")[0] == "tests") for p in (REPO / "bench").glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders
