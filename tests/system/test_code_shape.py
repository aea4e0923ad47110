"""The library's shape (retrieval, index, generation, serve, cli): no file name used twice, no file over 400 lines,
no function over 80 lines. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("retrieval", "index", "generation", "serve", "cli")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def library_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def repeated_names(paths: list[Path]) -> dict[str, list[str]]:
    """{file name: its paths} for every name (other than __init__.py) that more than one path uses."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        if p.name != "__init__.py":
            by_name[p.name].append(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p))
    return {name: found for name, found in by_name.items() if len(found) > 1}


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `source` longer than `limit` lines, decorators excluded."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_the_checks_find_what_they_look_for():
    paths = [Path("a/x.py"), Path("b/x.py"), Path("a/__init__.py"), Path("b/__init__.py"), Path("b/y.py")]
    assert repeated_names(paths) == {"x.py": ["a/x.py", "b/x.py"]}
    body = "\n".join(f"    v{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"def long():\n{body}\n\nclass C:\n    def short(self):\n        return 1\n"
    assert long_functions(source) == [("long", MAX_FUNCTION_LINES + 1)]
    assert long_functions(source, limit=MAX_FUNCTION_LINES + 1) == []


def test_no_library_file_name_is_used_twice():
    assert repeated_names(library_files()) == {}


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in library_files() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_library_function_is_over_80_lines():
    long = {str(p.relative_to(ROOT)): found for p in library_files() if (found := long_functions(p.read_text()))}
    assert not long, long
