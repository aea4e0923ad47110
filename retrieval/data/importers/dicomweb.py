"""A DICOMweb archive (Orthanc, dcm4chee, a cloud PACS) -> a manifest (`cxr data import dicomweb URL`).

QIDO-RS finds the instances (modality CR and DX, an optional StudyDate range and other filters), WADO-RS fetches
each one in its stored transfer syntax into a content-addressed cache (`dicom_cache.InstanceCache`: file name = hash
of the bytes, the SOP UID -> file map appended as it goes), several at a time (`workers`), with a progress bar.
A rerun, or a run after a kill, fetches only what the map does not hold yet. The SR documents of the found studies
are fetched too and give the reports. Rows are read from the cached files with the same code as the folder
import (importers/dicom_header.py), so an instance gives the same row from an archive as from a folder.

All HTTP goes through dicomweb-client. Auth: a bearer token, or a user and password (basic auth), from the options
or the environment (CXR_DICOMWEB_TOKEN, CXR_DICOMWEB_USER, CXR_DICOMWEB_PASSWORD); credentials are never logged.
With a pseudonymizer the cache holds PatientID and AccessionNumber as keyed hashes and no other patient tag
(pseudonym.pseudonymize_dataset).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from retrieval.data.importers.common import finish
from retrieval.data.importers.dicom_cache import InstanceCache
from retrieval.data.importers.dicom_folder import SKIPPED, reason_kind, skipped_note
from retrieval.data.importers.dicom_header import HeaderError, InstanceScan, read_header
from retrieval.data.importers.dicom_reports import attach_reports, read_report_csv
from retrieval.data.pseudonym import Pseudonymizer, key_from, pseudonymize_dataset
from retrieval.errors import ImportError_

log = logging.getLogger(__name__)
ENV_TOKEN, ENV_USER, ENV_PASSWORD = "CXR_DICOMWEB_TOKEN", "CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD"
QIDO_FIELDS = ("PatientID", "AccessionNumber", "StudyDate", "Modality", "SOPClassUID")
ANY_SYNTAX = (("application/dicom", "*"),)  # WADO-RS: the instance as stored, never transcoded


@dataclass(frozen=True)
class Instance:
    """One instance found by QIDO-RS."""

    study: str
    series: str
    sop: str
    modality: str = ""


@dataclass(frozen=True)
class Auth:
    """How to authenticate: a bearer token, or basic auth; `from_env` fills what the options left empty."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never show a credential
        kind = "bearer" if self.token else "basic" if self.user else "none"
        return f"Auth({kind})"

    @classmethod
    def from_env(cls, token: str | None = None, user: str | None = None, password: str | None = None) -> Auth:
        env = os.environ
        return cls(token or env.get(ENV_TOKEN) or None, user or env.get(ENV_USER) or None,
                   password or env.get(ENV_PASSWORD) or None)  # fmt: skip


def make_client(url: str, auth: Auth | None = None) -> Any:
    """A dicomweb_client.DICOMwebClient for `url` with the bearer token or basic auth of `auth`."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if auth is not None and auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth is not None and auth.user:
        session.auth = (auth.user, auth.password or "")
    return DICOMwebClient(url=url.rstrip("/"), session=session, timeout=60)


def study_date_range(since: str | None, until: str | None) -> str | None:
    """QIDO's StudyDate range 'YYYYMMDD-YYYYMMDD' (either end open); accepts YYYY-MM-DD too."""
    if not since and not until:
        return None
    a, b = ((d or "").replace("-", "") for d in (since, until))
    for d in (a, b):
        if d and (len(d) != 8 or not d.isdigit()):
            raise ImportError_(f"bad date {d!r}: use YYYYMMDD or YYYY-MM-DD")
    return f"{a}-{b}"


def _instances(found: Iterable[Mapping], modality: str) -> list[Instance]:
    from pydicom import Dataset

    out = []
    for item in found:
        ds = Dataset.from_json(dict(item))
        uids = [str(ds.get(t, "") or "") for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if all(uids):
            out.append(Instance(*uids, str(ds.get("Modality", "") or modality)))
    return out


def search_instances(
    client: Any,
    modalities: Iterable[str] = ("CR", "DX"),
    since: str | None = None,
    until: str | None = None,
    filters: Mapping[str, str] | None = None,
) -> list[Instance]:
    """QIDO-RS: every instance of the given modalities (and date range, filters), sorted by UIDs, no duplicates."""
    dates = study_date_range(since, until)
    found: dict[str, Instance] = {}
    for modality in modalities:
        query = {"Modality": modality, **dict(filters or {})}
        if dates:
            query["StudyDate"] = dates
        try:
            items = client.search_for_instances(search_filters=query, fields=list(QIDO_FIELDS), get_remaining=True)
        except Exception as e:  # requests.HTTPError and connection errors: one line naming the server's answer
            raise ImportError_(f"QIDO-RS search at {client.base_url} failed: {_http_reason(e)}") from None
        for inst in _instances(items, modality):
            found.setdefault(inst.sop, inst)
    return sorted(found.values(), key=lambda i: (i.study, i.series, i.sop))


def search_reports(client: Any, studies: Iterable[str], since: str | None = None, until: str | None = None) -> list:
    """QIDO-RS: the SR documents of the given studies, in one search (modality SR, the same StudyDate range); a
    failed search is logged and gives no reports (the images still import)."""
    wanted = set(studies)
    if not wanted:
        return []
    query = {"Modality": "SR"}
    dates = study_date_range(since, until)
    if dates:
        query["StudyDate"] = dates
    try:
        items = client.search_for_instances(search_filters=query, get_remaining=True)
    except Exception as e:
        log.warning("SR search failed, importing without SR reports: %s", _http_reason(e))
        return []
    return [inst for inst in _instances(items, "SR") if inst.study in wanted]


def _http_reason(error: Exception) -> str:
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    return f"{type(error).__name__}: {str(error)[:160]}"


def fetch_bytes(client: Any, inst: Instance, pseudonymize: Pseudonymizer | None = None) -> bytes:
    """WADO-RS: one instance as a DICOM file (as stored; pseudonymised when asked)."""
    import pydicom

    ds = client.retrieve_instance(inst.study, inst.series, inst.sop, media_types=ANY_SYNTAX)
    if pseudonymize is not None:
        pseudonymize_dataset(ds, pseudonymize)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def fetch_all(
    make: Callable[[], Any],
    instances: list[Instance],
    cache: InstanceCache,
    workers: int = 4,
    pseudonymize: Pseudonymizer | None = None,
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Fetch every instance the cache does not hold, `workers` at a time (one client per thread, from `make`);
    each lands in the cache as soon as it arrives. Returns (fetched, failures as 'SOP: reason')."""
    from retrieval.progress import make_progress

    todo = [i for i in instances if cache.get(i.sop) is None]
    local = threading.local()

    def one(inst: Instance) -> bytes:
        if not hasattr(local, "client"):
            local.client = make()
        return fetch_bytes(local.client, inst, pseudonymize)

    fetched, failures = 0, []
    with make_progress(disable=not progress) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        task = bar.add_task("WADO-RS fetch", total=len(todo), unit="instances")
        futures = {pool.submit(one, inst): inst for inst in todo}
        for future in as_completed(futures):
            inst = futures[future]
            try:
                cache.put(inst.sop, future.result())
                fetched += 1
            except Exception as e:  # one bad instance never stops the others
                failures.append(f"{inst.sop}: WADO-RS fetch failed: {_http_reason(e)}")
            bar.advance(task)
    return fetched, failures


def rows_from_cache(
    cache: InstanceCache, instances: list[Instance], reports: list[Instance]
) -> tuple[list[dict], dict[str, str], list[str]]:
    """Rows of the cached radiographs (read like the folder import), SR texts by study, skipped 'SOP: reason'."""
    scan = InstanceScan("dicomweb")  # already pseudonymised in the cache
    for inst in [*instances, *reports]:
        path = cache.get(inst.sop)
        if path is None:
            continue  # its fetch failed: listed already
        try:
            ds = read_header(path)
        except HeaderError as e:
            scan.skip(inst.sop, e.reason)
            continue
        scan.take(inst.sop, ds, path, inst.study)
    return scan.rows, scan.sr_texts, scan.skipped


def import_dicomweb(
    src: str,
    cache: str | Path | None = None,
    reports: str | Path | None = None,
    seed: int = 0,
    pseudonymize: str | Pseudonymizer | None = None,
    since: str | None = None,
    until: str | None = None,
    filters: Mapping[str, str] | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    workers: int = 4,
    progress: bool = True,
    **_: Any,
) -> pd.DataFrame:
    """A manifest of the CR/DX instances of the archive at `src` (its DICOMweb root), fetched into `cache`
    (default: ./dicom-cache). Failed fetches and skipped instances are listed in attrs['import_problems']."""
    pseudo = pseudonymize if isinstance(pseudonymize, Pseudonymizer) else key_from(pseudonymize)
    auth = Auth.from_env(token, user, password)
    store = InstanceCache(cache or "dicom-cache", pseudo)
    csv = read_report_csv(reports, pseudo) if reports else None
    client = make_client(src, auth)
    instances = search_instances(client, since=since, until=until, filters=filters)
    sr = search_reports(client, {i.study for i in instances}, since, until)
    log.info("QIDO-RS found %d radiograph instance(s) and %d SR document(s)", len(instances), len(sr))
    fetched, failures = fetch_all(lambda: make_client(src, auth), [*instances, *sr], store, workers, pseudo, progress)
    rows, sr_texts, skipped = rows_from_cache(store, instances, sr)
    notes = attach_reports(rows, sr_texts, csv)
    counts = Counter(reason_kind(s.split(": ", 1)[1]) for s in [*skipped, *failures])
    notes.insert(0, skipped_note(counts, len(rows)))
    notes.insert(1, f"fetched {fetched} instance(s) by WADO-RS; {len(instances) + len(sr) - fetched - len(failures)} "
                    f"already in the cache {store.folder}")  # fmt: skip
    if pseudo is not None:
        notes.append("PatientID and AccessionNumber stored as keyed pseudonyms (HMAC-SHA256)")
    log.info("dicomweb import: %s", notes[0])
    df = finish(rows, "dicomweb", seed=seed, problems=[*failures, *skipped], notes=notes)
    df.attrs[SKIPPED] = dict(counts)
    df.attrs["fetched"] = fetched
    return df
