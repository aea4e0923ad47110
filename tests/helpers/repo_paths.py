"""Where the checkout and these helpers are, for the tests that start a subprocess (its PYTHONPATH, its cwd) or read
a file of the tree (no tests here)."""

from __future__ import annotations

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
TESTS = HELPERS.parent
REPO = TESTS.parent
