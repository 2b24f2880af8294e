"""The packages' import graph: codec/ stands alone, eval/ uses training/ only to study training, no loops
inside training/, and bench/ imports nothing from tests/."""

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


PACKAGES = ("codec", "training", "eval", "server", "tests")

# eval/ modules that import training/, and why: each studies or reproduces what training does. The corpus
# reader is not among them: eval and training read listings with `codec.manifest`.
EVAL_USES_TRAINING = {
    "collapse": "the collapse study runs the trainer",
    "collapse_metrics": "it measures the trainer's dev clips, code usage and mel loss",
    "oracle": "it ranks the training losses against PESQ and uses the pitch head's training target",
    "samples": "it decodes G.722 prompts with the corpus job's decoder",
}


def packages_imported(folder: str) -> dict[str, set[str]]:
    """Module stem -> the other first-party packages it imports, for every module of `folder`."""
    return {
        p.stem: {m.split(".")[0] for m in imports(p)} & set(PACKAGES) - {folder}
        for p in sorted((REPO / folder).glob("*.py"))
    }


def test_codec_imports_nothing_above_it():
    offenders = {name: found for name, found in packages_imported("codec").items() if found}
    assert not offenders, offenders


def test_eval_imports_training_only_to_study_training():
    users = {name for name, found in packages_imported("eval").items() if "training" in found}
    assert users == set(EVAL_USES_TRAINING), users ^ set(EVAL_USES_TRAINING)
    assert not {name for name, found in packages_imported("training").items() if found & {"eval", "server"}}


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
