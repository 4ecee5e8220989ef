"""The package's shape: no import cycle among src/raptr modules (function-level imports included),
and the experiments load only when an experiment runs."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _import_graph() -> dict[str, set[str]]:
    files = {}
    for path in (SRC / "raptr").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path

    def module_of(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {module_of(a.name) for a in node.names if a.name.startswith("raptr")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("raptr"):
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else module_of(node.module)
                          for a in node.names}
        graph[name] = edges - {None, name, "raptr"}  # the package itself imports nothing eagerly (lazy __getattr__)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_no_import_cycle_among_raptr_modules():
    graph = _import_graph()
    assert len(graph) > 40 and "raptr.core" in graph["raptr.methods.raptr"]
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_command_line_loads_no_experiment_until_one_runs():
    code = ("import sys, raptr.cli; raptr.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('raptr.experiments.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['raptr.experiments.protocol']"
