"""Links from the viewer to the archive's own viewer (`cxr serve --archive-url TEMPLATE`).

The template names result fields in braces, e.g. OHIF's
`http://pacs/ohif/viewer?StudyInstanceUIDs={study_instance_uid}`; the web viewer (static/app.js) fills them with
each study's URL-encoded values and shows a link only where every named field has a value (rows imported from
DICOM). The server checks the template once, at start: only http(s) URLs and known fields.
"""

from __future__ import annotations

import string

from retrieval.data.manifest import DICOM_COLUMNS
from retrieval.errors import UsageError

# What a template may name: the archive's UIDs and tags of a DICOM row, and our own study id.
ARCHIVE_FIELDS: tuple[str, ...] = (*DICOM_COLUMNS, "study_id")


def check_archive_url(template: str) -> str:
    """The template, stripped, when it is an http(s) URL naming at least one field of ARCHIVE_FIELDS and no
    other; else a UsageError saying what is wrong."""
    template = str(template).strip()
    if not template.lower().startswith(("http://", "https://")):
        raise UsageError(f"--archive-url must be an http:// or https:// URL, got {template!r}")
    try:
        parts = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise UsageError(f"--archive-url {template!r}: {e}") from None
    if any(spec or conv for _, spec, conv in parts):
        raise UsageError(f"--archive-url {template!r}: plain {{field}} names only, no format specs or conversions")
    fields = [name for name, _, _ in parts]
    unknown = sorted({f for f in fields if f not in ARCHIVE_FIELDS})
    if unknown:
        raise UsageError(f"--archive-url names unknown field(s) {', '.join(unknown)}; use {', '.join(ARCHIVE_FIELDS)}")
    if not fields:
        raise UsageError("--archive-url names no field; e.g. '...?StudyInstanceUIDs={study_instance_uid}'")
    return template


def archive_link(template: str, row: dict) -> str | None:
    """The link for one result row (what app.js computes): the fields URL-encoded, None when one is empty."""
    from urllib.parse import quote

    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    values = {f: str(row.get(f) or "") for f in fields}
    if not all(values.values()):
        return None
    return template.format(**{f: quote(v, safe="!*'()") for f, v in values.items()})  # = encodeURIComponent
