"""The options of the commands that read a DICOMweb archive (`cxr data import dicomweb`, `cxr index sync`)."""

from __future__ import annotations

from pathlib import Path

import typer

CACHE = typer.Option(
    None, "--cache", help="dicomweb: the folder of fetched instances (default: dicom-cache beside the output)."
)
SINCE = typer.Option(None, "--since", help="dicomweb: only studies from this StudyDate on (YYYYMMDD or YYYY-MM-DD).")
UNTIL = typer.Option(None, "--until", help="dicomweb: only studies up to this StudyDate.")
FILTERS = typer.Option(
    None, "--filter", help="dicomweb: a further QIDO-RS filter KEY=VALUE (repeatable), e.g. InstitutionName=X."
)
TOKEN = typer.Option(None, "--token", help="dicomweb: bearer token (or set CXR_DICOMWEB_TOKEN).", show_default=False)
USER = typer.Option(None, "--user", help="dicomweb: basic-auth user (or set CXR_DICOMWEB_USER).")
PASSWORD = typer.Option(
    None, "--password", help="dicomweb: basic-auth password (better: set CXR_DICOMWEB_PASSWORD).", show_default=False
)
FETCH_WORKERS = typer.Option(4, "--fetch-workers", min=1, help="dicomweb: parallel WADO-RS fetches.")
PSEUDONYMIZE = typer.Option(
    None,
    "--pseudonymize",
    help="dicom/dicomweb: store PatientID and AccessionNumber as HMAC-SHA256 pseudonyms under this key (or set "
    "CXR_PSEUDONYM_KEY).",
    show_default=False,
)


def parse_filters(items: list[str] | None) -> dict[str, str]:
    """['Key=Value', ...] -> {Key: Value}; a malformed item is a UsageError."""
    from retrieval.errors import UsageError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --filter {item!r}: expected KEY=VALUE (a DICOM keyword, e.g. StudyDescription=X)")
        out[key.strip()] = value.strip()
    return out


def default_cache(out: Path) -> Path:
    """The cache folder beside a manifest or index."""
    return out.resolve().parent / "dicom-cache"
