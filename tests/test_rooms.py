"""The shape of the package: imports run one way, no cycles, no Flower below federation.

The import graph is read from the source with ``ast`` (module-level, function-level and
``TYPE_CHECKING`` imports alike), so a cycle hidden in a function body still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedmed"

# Rooms from the top of the stack down (DESIGN.md): a room may import only rooms below it.
ROOM_ORDER = ("cli", "evaluation", "federation", "export", "training", "models", "data",
              "security", "base")
FLOWER_FREE = ("data", "models", "training")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """fedmed modules (and ``flwr`` as one node) that ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c.split(".")[0] == "flwr":
                out.add("flwr")
            elif c in modules and c != name:
                out.add(c)
    return out


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {m: _imports(p, modules) for m, p in paths.items()}
    # A package importing its own children (re-exports) is not a cycle.
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".") and not m.startswith(t + ".")}
    return graph


def _room(module: str) -> str:
    """``fedmed.data.io`` -> ``data``; ``fedmed.config``, ``fedmed.policy.model`` -> ``base``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOM_ORDER else "base"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w == "flwr":
                continue
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_of_fedmed_is_acyclic() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"fedmed.a": {"fedmed.b"}, "fedmed.b": {"fedmed.c"}, "fedmed.c": {"fedmed.a"}}
    assert _find_cycle(graph) == ["fedmed.a", "fedmed.b", "fedmed.c", "fedmed.a"]
    assert _find_cycle({"fedmed.a": {"fedmed.b"}, "fedmed.b": set()}) is None


def test_rooms_import_only_downwards() -> None:
    rank = {room: i for i, room in enumerate(ROOM_ORDER)}
    upward = [
        f"{m} -> {t}"
        for m, targets in _graph().items()
        for t in targets
        if t != "flwr" and rank.get(_room(t), 0) < rank.get(_room(m), 0)
    ]
    assert not upward, "imports against the room order " + " > ".join(ROOM_ORDER) + ":\n" + (
        "\n".join(sorted(upward))
    )


@pytest.mark.parametrize("room", FLOWER_FREE)
def test_data_models_and_training_know_nothing_of_flower(room: str) -> None:
    users = sorted(m for m, t in _graph().items() if _room(m) == room and "flwr" in t)
    assert not users, f"{room} must not import Flower: {users}"


def test_no_module_over_500_lines() -> None:
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := p.read_text().count("\n")) > 500}
    assert not big, f"modules over 500 lines: {big}"
