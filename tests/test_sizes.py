"""Sizes a newcomer reads in one sitting (issue #14, "one layer per job"): no function over
40 lines in the engine and the Ray side, no file of the package over 300 lines (the config
tree excepted: one dataclass per section, read as a reference, not top to bottom), and the
train loop under 250. A file that grows past them has taken on a second job: split it
along its jobs rather than raise the numbers."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddetr_dist"
MAX_FUNCTION_LINES = 40
FUNCTION_LIMITED_PARTS = ("engine", "on_ray")
MAX_FILE_LINES = 300
FILE_LIMIT_EXEMPT = {PACKAGE / "config.py"}
TRAIN_LOOP = PACKAGE / "engine" / "loop.py"
MAX_TRAIN_LOOP_LINES = 249


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def long_functions(path: Path, limit: int) -> list[str]:
    """Functions and methods (nested ones too) longer than `limit` lines, decorators aside."""
    return [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_functions_of_the_engine_and_the_ray_side_are_short():
    found = [entry for part in FUNCTION_LIMITED_PARTS for path in sorted((PACKAGE / part).rglob("*.py"))
             for entry in long_functions(path, MAX_FUNCTION_LINES)]
    assert found == [], f"over {MAX_FUNCTION_LINES} lines"


def test_files_of_the_package_are_short():
    found = [f"{path.relative_to(PACKAGE.parent)} ({line_count(path)} lines)" for path in sorted(PACKAGE.rglob("*.py"))
             if path not in FILE_LIMIT_EXEMPT and line_count(path) > MAX_FILE_LINES]
    assert found == [], f"over {MAX_FILE_LINES} lines"


def test_the_train_loop_reads_in_one_sitting():
    assert line_count(TRAIN_LOOP) <= MAX_TRAIN_LOOP_LINES


def test_the_checks_see_what_they_measure():
    """A long function is found (so that an empty list above means something)."""
    assert long_functions(PACKAGE / "config.py", 5)
    assert line_count(TRAIN_LOOP) > 50
