"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def demo_data_cmd() -> None:
    """Not built yet."""
    raise CXRError("`data_demo` is not built yet")
