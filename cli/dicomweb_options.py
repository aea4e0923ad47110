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


def import_options(kind: str, out: Path, pseudonymize, cache, since, until, filters, token, user, password,
                   fetch_workers: int) -> dict:  # fmt: skip
    """`cxr data import`'s DICOM options as importer keywords; a DICOMweb option given to another kind (or
    --pseudonymize to a non-DICOM kind) is a UsageError, never silently ignored."""
    from retrieval.errors import UsageError

    web_only = {"--cache": cache, "--since": since, "--until": until, "--filter": filters, "--token": token,
                "--user": user, "--password": password}  # fmt: skip
    given = [name for name, value in web_only.items() if value]
    if kind != "dicomweb" and (given or fetch_workers != 4):
        raise UsageError(f"{', '.join(given) or '--fetch-workers'}: only for the dicomweb kind")
    if pseudonymize and kind not in ("dicom", "dicomweb"):
        raise UsageError("--pseudonymize: only for the dicom and dicomweb kinds")
    options = {"pseudonymize": pseudonymize}
    if kind == "dicomweb":
        options |= {
            "cache": cache or default_cache(out), "since": since, "until": until, "token": token, "user": user,
            "filters": parse_filters(filters), "password": password, "workers": fetch_workers,
        }  # fmt: skip
    return options
