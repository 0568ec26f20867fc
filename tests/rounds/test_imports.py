"""The campaign's modules import each other without a circle: `serve` steps a campaign, so it may import
`campaign`, and nothing `campaign` needs (its config, the webhook secret, the label sources) lives in
`serve`. Function-level imports count: a circle hidden in a function is still a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROUNDS = Path(__file__).resolve().parents[2] / "pipeline" / "rounds"
PACKAGE = "pipeline.rounds"


def _imports(module: str) -> set[str]:
    """The `pipeline.rounds` modules that `module` imports anywhere in its source."""
    tree = ast.parse((ROUNDS / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n.removeprefix(f"{PACKAGE}.").split(".")[0] for n in names if n.startswith(f"{PACKAGE}.")}
    return found & {p.stem for p in ROUNDS.glob("*.py")} - {module}


def test_campaign_does_not_import_serve() -> None:
    assert "serve" not in _imports("campaign")


def test_serve_uses_campaign_for_step_alone() -> None:
    tree = ast.parse((ROUNDS / "serve.py").read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "campaign"
    }
    from_campaign = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == f"{PACKAGE}.campaign"
        for alias in node.names
    }
    assert used | from_campaign == {"step"}


def test_the_campaign_modules_import_each_other_without_a_circle() -> None:
    graph = {p.stem: _imports(p.stem) for p in ROUNDS.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join((*path[path.index(module) :], module)))
        if module in done:
            return
        for other in sorted(graph.get(module, ())):
            visit(other, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
