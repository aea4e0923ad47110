"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def generate_cmd() -> None:
    """Not built yet."""
    raise CXRError("`generate` is not built yet")
