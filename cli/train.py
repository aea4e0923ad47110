"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def train_cmd() -> None:
    """Not built yet."""
    raise CXRError("`train` is not built yet")
