"""House rules a reader relies on, checked as the linters are: short functions, no shared
closure state (the training worker and the index keep theirs in plain objects)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
LONGEST = 60  # lines: a function reads on one screen


def _functions():
    for path in sorted([*ROOT.glob("pipelines/*.py"), *ROOT.glob("model/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            yield path.relative_to(ROOT), node


def test_no_function_in_pipelines_or_model_is_longer_than_a_screen():
    long = [
        f"{path}::{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for path, n in _functions()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > LONGEST
    ]
    assert long == [], f"over {LONGEST} lines: split them: {long}"


def test_no_function_shares_state_through_nonlocal():
    found = [f"{path}:{n.lineno}" for path, n in _functions() if isinstance(n, ast.Nonlocal)]
    assert found == [], f"nonlocal state (keep it in an object): {found}"
