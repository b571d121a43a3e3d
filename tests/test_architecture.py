"""The import arrows of docs/architecture.md, checked on the source (ast; no module is imported).

Every import counts: module level, inside functions (lazy), under `if TYPE_CHECKING:`. Each module
of src/pgolf belongs to one room; rooms sit on tiers and arrows point down a tier:

    4  cli                                        the edge: parses argv, prints, exits
    3  run (pipeline), bench                      chain or measure the stages
    2  train quantize evaluate results cloud submission   the stages
    1  data model store                           what the stages are built from
    0  ground: config dist errors fileio runid runinfo (top-level modules, and pgolf/__init__)

A module may import its own room, any room on a lower tier, and, on its own tier, only another
room's contract modules (CONTRACTS: the files a neighbour is allowed to read, such as the artifact
format). Import cycles are refused between modules and between rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "pgolf"

GROUND = {"config", "dist", "errors", "fileio", "runid", "runinfo"}  # pgolf/<name>.py
TIERS = {
    "ground": 0,
    "data": 1, "model": 1, "store": 1,
    "train": 2, "quantize": 2, "evaluate": 2, "results": 2, "cloud": 2, "submission": 2,
    "run": 3, "bench": 3,
    "cli": 4,
}
# Same-tier imports go only to these modules (a room's published contract, not its internals).
CONTRACTS = {
    "store": {"pgolf.store"},  # data fetch/push: open_store, join_key (the ObjectStore interface)
    "quantize": {"pgolf.quantize", "pgolf.quantize.artifact", "pgolf.quantize.meta"},  # the artifact file
    "submission": {"pgolf.submission.bundle"},  # the generated train_gpt.py: its bytes, the file a launch ships
}


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


MODULES = {module_name(p)[0]: p for p in sorted(PKG.rglob("*.py"))}


def room_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in GROUND):
        return "ground"
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """The pgolf modules `path` imports anywhere in its body (a `from m import n` names m.n when
    m.n is a module, else m)."""
    name, is_package = module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [(module, a.name) for a in node.names]
        else:
            continue
        for module, attr in targets:
            if module.split(".")[0] != "pgolf":
                continue
            target = f"{module}.{attr}" if attr and f"{module}.{attr}" in MODULES else module
            if target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def violation(src: str, dst: str) -> str | None:
    a, b = room_of(src), room_of(dst)
    if a == b:
        return None
    if TIERS[b] < TIERS[a]:
        return None
    if TIERS[b] == TIERS[a]:
        if dst in CONTRACTS.get(b, ()):
            return None
        return (f"{src} imports {dst}: {b} is a neighbour of {a} (tier {TIERS[a]}), and {dst} is not one of "
                f"its contract modules ({', '.join(sorted(CONTRACTS.get(b, ()))) or 'none'})")
    return f"{src} imports {dst}: {a} (tier {TIERS[a]}) may not import {b} (tier {TIERS[b]}), arrows point down"


def test_every_module_is_in_a_known_room():
    """A new top-level module is shared ground (add it to GROUND, and keep it importing only ground)
    or belongs in a room; a new folder is a new room with a tier."""
    strays = sorted(n for n in MODULES if room_of(n) not in TIERS)
    assert not strays, f"modules outside every room: {strays}; see docs/architecture.md"
    top = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in GROUND | {"__init__", "run"})
    assert not top, f"top-level modules that are not shared ground: {top}"
    rooms = sorted(p.name for p in PKG.iterdir() if p.is_dir() and any(p.glob("*.py")))
    assert set(rooms) == set(TIERS) - {"ground", "run"}, rooms
    for room in rooms:  # a room is a regular package (setuptools' find_packages needs __init__.py)
        assert (PKG / room / "__init__.py").is_file(), room


def test_the_graph_sees_lazy_and_relative_imports():
    assert "pgolf.submission.bundle" in GRAPH["pgolf.quantize.report"]  # inside a function
    assert "pgolf.cloud.cost" in GRAPH["pgolf.run"]  # inside a function
    assert "pgolf.store.s3" in GRAPH["pgolf.store"]  # inside open_store


def test_no_import_cycle_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for src, dsts in GRAPH.items():
        rooms.setdefault(room_of(src), set()).update(room_of(d) for d in dsts if room_of(d) != room_of(src))
    cycle = find_cycle(rooms)
    assert cycle is None, "rooms import each other: " + " -> ".join(cycle)


def test_arrows_point_down_and_neighbours_use_contracts():
    bad = [v for src, dsts in sorted(GRAPH.items()) for dst in sorted(dsts) if (v := violation(src, dst))]
    assert not bad, "\n".join(bad)


def test_shared_ground_imports_only_shared_ground():
    for name in sorted(n for n in MODULES if room_of(n) == "ground"):
        above = sorted(d for d in GRAPH[name] if room_of(d) != "ground")
        assert not above, f"{name} (shared ground) imports {above}"


@pytest.mark.parametrize("src,dst,ok", [
    ("pgolf.config", "pgolf.model", False),  # ground reaching up
    ("pgolf.model.gpt", "pgolf.train.optim", False),  # a building block reaching into a stage
    ("pgolf.evaluate.core", "pgolf.quantize.artifact", True),  # a neighbour's contract
    ("pgolf.evaluate.core", "pgolf.quantize.gptq", False),  # a neighbour's internals
    ("pgolf.quantize.calibrate", "pgolf.data.loader", True),  # down a tier, any module
    ("pgolf.run", "pgolf.cli", False),
    ("pgolf.cli.results", "pgolf.store.seaweed", True),
])
def test_the_rule_itself(src, dst, ok):
    assert (violation(src, dst) is None) == ok
