"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def eval_retrieval_cmd() -> None:
    """Not built yet."""
    raise CXRError("`eval_retrieval` is not built yet")
