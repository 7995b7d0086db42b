"""The package's shape, from its own source (docs/architecture.md): imports point one way and a serving replica
loads none of the training, evaluation-report or CLI code."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict

from tests.conftest import ROOT

PACKAGE = ROOT / "ray_app"
STAGES = {"data", "train", "tune", "study", "evaluate", "batch", "batch_inputs", "feedback", "replay", "pipeline"}
STAGES |= {"monitor", "monitor_policy", "reference", "drift"}
STAGES |= {
    "tune_results",
    "epoch_logger",
    "train_batches",
    "canary_report",
    "cli",
    "results",
    "deploy",
    "config_loader",
    "cli_edges",
    "loop",
    "loop_actor",
    "loop_cli",
    "loop_state",
}


def _imports() -> dict[str, set[str]]:
    """Module -> the ray_app modules it imports anywhere in its body (function-level imports too)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_app."):
                graph[module].add(node.module.removeprefix("ray_app."))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    return next((found for m in sorted(graph) if m not in state and (found := visit(m, [m]))), None)


def test_no_import_cycle_and_serving_imports_no_stage():
    graph = _imports()
    assert _cycle(graph) is None, _cycle(graph)
    for module, targets in graph.items():
        if module.startswith("serve."):
            assert not targets & STAGES, (module, targets & STAGES)
        if module in STAGES:
            assert not any(t.startswith("serve") for t in targets), (module, targets)


def test_no_module_is_over_about_400_lines():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {m: n for m, n in sizes.items() if n > 410}, sizes


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_a_replica_loads_no_training_evaluation_or_cli_code():
    code = (
        "import sys, ray_app.serve.app; "
        "print(sorted(m for m in sys.modules if m.startswith(('ray_app.', 'matplotlib'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in [*sorted(STAGES), "matplotlib"]:
        name = module if module == "matplotlib" else f"ray_app.{module}"
        assert f"'{name}'" not in loaded, (name, loaded)
