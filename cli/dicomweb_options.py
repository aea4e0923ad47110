"""The options of the commands that read a DICOMweb archive (`cxr data import dicomweb`, `cxr index sync`): the
`archive_options` decorator gives a command all of them as one `archive: ArchiveOptions` argument."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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




@dataclass(frozen=True)
class ArchiveOptions:
    """What the archive options say (None: not given)."""

    pseudonymize: str | None = None
    cache: Path | None = None
    since: str | None = None
    until: str | None = None
    filters: list[str] | None = None
    token: str | None = None
    user: str | None = None
    password: str | None = None
    fetch_workers: int = 4

    def query(self) -> dict[str, Any]:
        """The importer's (and the sync's) keywords for the archive, all but the cache."""
        return {"since": self.since, "until": self.until, "filters": parse_filters(self.filters), "token": self.token,
                "user": self.user, "password": self.password, "workers": self.fetch_workers,
                "pseudonymize": self.pseudonymize}  # fmt: skip


# Each field of ArchiveOptions as a command-line option: (type, typer option).
_OPTIONS: dict[str, tuple[Any, Any]] = {
    "pseudonymize": (str, PSEUDONYMIZE),
    "cache": (Path, CACHE),
    "since": (str, SINCE),
    "until": (str, UNTIL),
    "filters": (list[str], FILTERS),
    "token": (str, TOKEN),
    "user": (str, USER),
    "password": (str, PASSWORD),
    "fetch_workers": (int, FETCH_WORKERS),
}
assert list(_OPTIONS) == [f.name for f in fields(ArchiveOptions)]


def archive_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: `command` (which takes `archive: ArchiveOptions`) as typer sees it, with the archive options in
    place of `archive` (after its own options); typer's parsed values reach it as one ArchiveOptions."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "archive"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in _OPTIONS.items()]  # fmt: skip

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        archive = ArchiveOptions(**{name: kwargs.pop(name) for name in _OPTIONS})
        return command(*args, archive=archive, **kwargs)

    run.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
    return run


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


def import_options(kind: str, out: Path, archive: ArchiveOptions) -> dict:
    """`cxr data import`'s DICOM options as importer keywords; a DICOMweb option given to another kind (or
    --pseudonymize to a non-DICOM kind) is a UsageError, never silently ignored."""
    from retrieval.errors import UsageError

    a = archive
    web_only = {"--cache": a.cache, "--since": a.since, "--until": a.until, "--filter": a.filters,
                "--token": a.token, "--user": a.user, "--password": a.password}  # fmt: skip
    given = [name for name, value in web_only.items() if value]
    if kind != "dicomweb" and (given or a.fetch_workers != 4):
        raise UsageError(f"{', '.join(given) or '--fetch-workers'}: only for the dicomweb kind")
    if a.pseudonymize and kind not in ("dicom", "dicomweb"):
        raise UsageError("--pseudonymize: only for the dicom and dicomweb kinds")
    if kind != "dicomweb":
        return {"pseudonymize": a.pseudonymize}
    return {**a.query(), "cache": a.cache or default_cache(out)}
