"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def eval_generation_cmd() -> None:
    """Not built yet."""
    raise CXRError("`eval_generation` is not built yet")
