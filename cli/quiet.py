"""What the CLI does about third-party libraries' own output: their progress bars stay out of the commands'.

The library never changes these global settings itself; the commands that reach transformers call this first.
"""

from __future__ import annotations


def quiet_transformers() -> None:
    """Turn off transformers' tqdm bars ("Loading weights", "Writing model shards") for the rest of the process:
    the commands show their own progress (`retrieval.progress`). Imports transformers (seconds), so only the
    commands that load or save its models call it; download bars of `cxr models prefetch` are huggingface_hub's
    and stay on."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
