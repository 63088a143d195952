"""The project's modules and who imports whom: a picture of the tree, layer by layer, and its import cycles.

    python tools/import_graph.py          # modules by layer (a module imports only modules of lower layers),
                                          # their lines and their project imports; exit 1 on a cycle

Modules are the top-level scripts and the packages beside them (engine/, camvid/); tools/ and tests/ are not.
Every import counts, also one inside a function or under `if TYPE_CHECKING:`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "camvid")


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for the top-level .py files and those of the packages."""
    files = sorted(root.glob("*.py")) + [path for package in PACKAGES for path in sorted((root / package).glob("*.py"))]
    return {".".join(path.relative_to(root).with_suffix("").parts): path for path in files}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports (`from engine import budget` counts as engine.budget)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found - {"engine", "camvid"} if found else found  # a package's __init__ holds no code


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by layer: layer 0 imports no project module, layer n only modules of layers below n."""
    level: dict[str, int] = {}

    def depth(node: str) -> int:
        if node not in level:
            level[node] = 0  # a cycle (reported elsewhere) must not recurse forever
            level[node] = 1 + max((depth(target) for target in graph[node]), default=-1)
        return level[node]
    for node in graph:
        depth(node)
    return [sorted(n for n in graph if level[n] == index) for index in range(max(level.values()) + 1)]


def main() -> int:
    graph, modules = import_graph(), project_modules()
    for index, names in enumerate(layers(graph)):
        print(f"layer {index}")
        for name in names:
            lines = len(modules[name].read_text(encoding="utf-8").splitlines())
            imports = ", ".join(sorted(graph[name])) or "-"
            print(f"  {name:22} {lines:4} lines  <- {imports}")
    loops = cycles(graph)
    for loop in loops:
        print("cycle: " + " -> ".join(loop))
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main())
