"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def demo_cmd() -> None:
    """Not built yet."""
    raise CXRError("`demo` is not built yet")
