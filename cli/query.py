"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def query_cmd() -> None:
    """Not built yet."""
    raise CXRError("`query` is not built yet")
