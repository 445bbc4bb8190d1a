"""The house as the design card draws it: common.py at the top for the scripts, the package behind it, no arrows
back and no circles (read from the code's own imports)."""
import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unlearning"
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}  # common.py and every script a user runs


def imported_names(path):
    """(package modules imported, top-level names imported) by the module at path, function-level imports included."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            inside.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom):
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
    return inside, outside


def test_common_is_a_file_at_the_top_and_hands_on_the_package_names():
    assert (ROOT / "common.py").is_file() and not (ROOT / "common").exists()
    assert Path(common.__file__).resolve() == ROOT / "common.py"
    assert common.prune.__module__ == "unlearning.pruning" and common.load_data.__module__ == "unlearning.data"


def test_the_package_imports_neither_common_nor_a_script_and_has_no_cycles():
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        inside, outside = imported_names(path)
        assert not outside & SCRIPTS, f"{path.name} imports {sorted(outside & SCRIPTS)}"
        assert "unlearning" not in outside, f"{path.name} imports its own package by name"
        graph[path.stem] = inside
    assert graph.pop("__init__") == set()  # the package imports nothing on its own: `from unlearning import x` is light
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as cycle:
        raise AssertionError(f"import cycle: {cycle.args[1]}") from None
    assert set(order) >= set(graph)
