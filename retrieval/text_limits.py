"""How much text one request or one manifest row may carry.

A query sentence, a VQA question or a grounding phrase over `MAX_QUERY_CHARS` is refused (`TextTooLong`, a
usage error naming the limit: exit 2 in the CLI, HTTP 413 in `cxr serve`). A manifest report over
`MAX_REPORT_CHARS` is cut there when an index is built, with one warning naming the rows. The labeler is linear in
the text's length, so these limits bound each request's work; they are far above any real report (the longest
of IU X-ray's 3,955 is 1,412 characters).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from retrieval.errors import UsageError

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000
MAX_REPORT_CHARS = 20_000


class TextTooLong(UsageError):
    """A query text, question or phrase over the limit; `limit` is the limit in characters."""

    def __init__(self, what: str, length: int, limit: int):
        self.limit = limit
        super().__init__(f"{what} is {length:,} characters long; the limit is {limit:,}")


def check_query_text(text: str | None, what: str = "the query text", limit: int = MAX_QUERY_CHARS) -> None:
    """Raise TextTooLong when `text` is over `limit` characters (None passes)."""
    if text is not None and len(text) > limit:
        raise TextTooLong(what, len(text), limit)


def truncate_reports(reports: Iterable[str], ids: Iterable[str], limit: int = MAX_REPORT_CHARS) -> list[str]:
    """The reports, each cut to `limit` characters; one warning names how many were cut and the first ids."""
    out, cut = [], []
    for text, rid in zip(reports, ids, strict=True):
        if len(text) > limit:
            cut.append(str(rid))
            text = text[:limit]
        out.append(text)
    if cut:
        shown = ", ".join(cut[:5]) + (f" and {len(cut) - 5:,} more" if len(cut) > 5 else "")
        log.warning("%d report(s) over %s characters were cut to that length: %s", len(cut), f"{limit:,}", shown)
    return out
