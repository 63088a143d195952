"""The shape of the code: train.py is the command line over engine/, nothing imports it, and no two modules
import each other in a circle (tools/import_graph.py draws the picture)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_nothing_imports_train_py():
    """The modules train.py wires together take what they need as typed settings: none of them imports train,
    not even for type hints or inside a function (bench.py included)."""
    graph = import_graph.import_graph()
    assert "train" in graph and "engine.loop" in graph and "bench" in graph
    assert [name for name, imports in graph.items() if "train" in imports] == []


def test_no_import_cycle():
    assert import_graph.cycles(import_graph.import_graph()) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import g\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    graph = import_graph.import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert import_graph.cycles(graph) == [["a", "b", "c", "a"]]


def test_train_py_stays_a_short_cli_and_no_module_grows_past_450_lines():
    """One concern a module: train.py is the command line (at most 300 lines), and no module or package file of
    the project is over 450 lines."""
    modules = import_graph.project_modules()
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()}
    assert lines["train"] <= 300
    assert {name: count for name, count in lines.items() if count > 450} == {}
