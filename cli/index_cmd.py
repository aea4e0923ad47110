"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def build_cmd() -> None:
    """Not built yet."""
    raise CXRError("`index_cmd` is not built yet")


def add_cmd() -> None:
    """Not built yet."""
    raise CXRError("`index_cmd` is not built yet")


def info_cmd() -> None:
    """Not built yet."""
    raise CXRError("`index_cmd` is not built yet")
