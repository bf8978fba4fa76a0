"""The house keeps its shape: no import circle, arrows one way, rooms of a readable size.

Read from the sources with ``ast`` (type-only and function-level imports included),
so a circle cannot hide behind ``TYPE_CHECKING`` or a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "aecho").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The aecho modules ``path`` imports, anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in known:
                out.add(name)
    return out


GRAPH = {name: imports(path, modules()) - {name} for name, path in modules().items()}


def test_no_import_circle() -> None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_over_500_lines(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def reaches(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def inside(package: str) -> list[str]:
    return [name for name in GRAPH if name == package or name.startswith(package + ".")]


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("aecho.server", "aecho.process"),  # the server announces through callbacks
        ("aecho.offload", "aecho.server"),  # the pool knows nothing of sockets
        ("aecho.offload", "aecho.process"),
        ("aecho.client", "aecho.server"),
        ("aecho.bench", "aecho.server"),  # bench starts `aecho serve`, never imports it
        ("aecho.config", "aecho.server"),
        ("aecho.server.metrics", "aecho.server.server"),  # metrics read Stats only
    ],
)
def test_arrows_run_one_way(lower: str, upper: str) -> None:
    for name in inside(lower):
        bad = sorted(n for n in reaches(name) if n == upper or n.startswith(upper + "."))
        assert not bad, f"{name} reaches {bad}"
