"""Placeholder: this command is not built yet (see the open issues)."""

from retrieval.errors import CXRError


def vlm_train_cmd() -> None:
    """Not built yet."""
    raise CXRError("`vlm_train` is not built yet")
