"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def import_cmd() -> None:
    """Not built yet."""
    raise CXRError("`data_import` is not built yet")


def validate_cmd() -> None:
    """Not built yet."""
    raise CXRError("`data_import` is not built yet")
