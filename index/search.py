"""The `Searcher`: what `cxr query`, `cxr serve`, `cxr demo` and the VLM's retrieval-augmented generation call
to search an index folder, and the one search filter (`Searcher.search_ids`).

Queries exclude nothing unless asked (`exclude_patient`, `exclude_study`). Report searches return each study
once (reports.faiss holds one vector per image row, so a study's report repeats per image); with
`one_per_patient`, each patient once. `match` says whether a query has a close match at all (index/abstain.py).
The backends that run the raw top-k search and the query-time parameters are in `index/backends.py`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from index import abstain
from index.backends import apply_tuned, check_scores, make_backend, scores_are_bounded, set_search_params
from index.layout import OPTIONAL_META_COLUMNS
from index.store import CXRIndex, open_index
from retrieval.errors import UsageError
from retrieval.text_limits import check_query_text

RESULT_COLUMNS = [
    "rank",
    "score",
    "row_id",
    "image_id",
    "study_id",
    "patient_id",
    "view",
    "labels",
    "report",
    "image_path",
    "split",
    *OPTIONAL_META_COLUMNS,  # the archive's UIDs (DICOM rows); '' for rows from other sources
]


@dataclass(frozen=True)
class _Filter:
    """What `search_ids` keeps besides the exclusions (see there)."""

    allowed: np.ndarray | None
    require_report: bool
    per_study: bool
    per_patient: bool = False


class Searcher:
    """Query an index folder by image, text or vector; results are DataFrames of RESULT_COLUMNS.

    Searches use the efSearch / nprobe / k_factor tuned at build time (index_info.json `search`); `nprobe`,
    `ef_search` and `k_factor` override them (`search_params` holds what applies per target).

    `model` is needed for image and text queries (its fingerprint must match the index); vector queries need
    none. `one_per_patient`: results keep each patient's best row only (`cxr query`'s default), so five studies
    of one patient never fill a top 5.
    """

    def __init__(
        self,
        index_dir: str | Path | CXRIndex,
        model: Any = None,
        backend: str = "auto",
        device: str | None = None,
        precision: str = "fp32",
        nprobe: int | None = None,
        ef_search: int | None = None,
        mmap: bool = False,
        k_factor: int | None = None,
        one_per_patient: bool = False,
    ):
        self.one_per_patient = bool(one_per_patient)
        self.index = index_dir if isinstance(index_dir, CXRIndex) else open_index(index_dir, model, mmap=mmap)
        if isinstance(index_dir, CXRIndex) and model is not None:
            from index.store import check_model

            check_model(self.index.info, model, self.index.path)
        self.model = model
        # The parameters tuned at build time, then the caller's overrides on top.
        overrides = {"nprobe": nprobe, "efSearch": ef_search, "k_factor": k_factor}
        self.search_params: dict[str, dict[str, int]] = {}
        for target in ("images", "reports"):
            idx = self.index.target(target)
            params = apply_tuned(idx, self.index.info, target, self.index.file(target))
            set_search_params(idx, nprobe, ef_search, k_factor)
            params.update({k: int(v) for k, v in overrides.items() if v is not None})
            self.search_params[target] = params
        self._backend_args = (backend, device, precision)
        self._backends: dict[str, Any] = {}
        meta = self.index.meta
        self._patients = meta["patient_id"].astype(str).to_numpy()
        self._studies = meta["study_id"].astype(str).to_numpy()
        self._has_report = meta["has_report"].to_numpy(dtype=bool)
        self._bounded = scores_are_bounded(self.index.info)
        self._row_findings: list | None = None  # per row, its report's findings (for findings-aware text search)
        self._columns: dict[str, np.ndarray] = {}  # meta columns as numpy arrays, taken on first use (`column`)

    def backend(self, target: str) -> Any:
        """The (lazily created) backend searching `target` ('images' or 'reports')."""
        if target not in self._backends:
            self._backends[target] = make_backend(self.index.target(target), *self._backend_args)
        return self._backends[target]

    def _need_model(self) -> Any:
        if self.model is None:
            raise UsageError("image and text queries need the model the index was built with")
        return self.model

    def study_mask(self, studies: Collection[str]) -> np.ndarray:
        """A boolean mask over the index rows: the rows of `studies` (for `search_ids(allowed=...)`)."""
        return np.isin(self._studies, np.asarray([str(s) for s in studies], dtype=object))

    def _keep(self, ids: np.ndarray, patient: str | None, study: str | None, rule: _Filter) -> np.ndarray:
        """The usable ids among `ids`, best first: valid, allowed, not excluded, with a report (when required),
        one per study (when asked)."""
        ids = ids[ids >= 0]
        ok = np.ones(len(ids), dtype=bool) if rule.allowed is None else rule.allowed[ids]
        if patient is not None:
            ok &= self._patients[ids] != str(patient)
        if study is not None:
            ok &= self._studies[ids] != str(study)
        if rule.require_report:
            ok &= self._has_report[ids]
        ids = ids[ok]
        if rule.per_study and len(ids):
            _, first = np.unique(self._studies[ids], return_index=True)
            ids = ids[np.sort(first)]
        if rule.per_patient and len(ids):
            _, first = np.unique(self._patients[ids], return_index=True)
            ids = ids[np.sort(first)]
        return ids

    def search_ids(
        self,
        queries: np.ndarray,
        k: int = 5,
        target: str = "reports",
        exclude_patients: Sequence[str | None] | None = None,
        exclude_studies: Sequence[str | None] | None = None,
        allowed: np.ndarray | None = None,
        require_report: bool | None = None,
        per_study: bool | None = None,
        per_patient: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids), each (n_queries, k), after the filter; padded with -inf / -1 where fewer than k rows
        qualify. The one search filter: `cxr query`, serve, evaluation and the VLM's RAG all come through here.

        - `exclude_patients` / `exclude_studies`: per query, rows of that patient / study are dropped (None: none).
        - `allowed`: a boolean mask over the index rows; only those rows are returned (`study_mask(studies)`
          makes one from study ids).
        - `require_report`: drop rows without a report (default: for the reports target).
        - `per_study`: keep each study's best row only (default: for the reports target, whose vectors repeat
          a study's report per image).
        - `per_patient`: keep each patient's best row only (default: the Searcher's `one_per_patient`).

        The search widens (4x per round) until k rows survive or every row was looked at, so the result is the
        top k of the filtered ranking."""
        if k < 1:
            raise UsageError(f"-k must be at least 1, got {k}")
        self.index.ensure_intact()  # a quick open answers only once its background hash has matched
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.index.dim:
            raise UsageError(f"query vectors have dim {queries.shape[1]}, the index has {self.index.dim}")
        nq, n = len(queries), self.index.count
        pats = list(exclude_patients) if exclude_patients is not None else [None] * nq
        studs = list(exclude_studies) if exclude_studies is not None else [None] * nq
        reports = target == "reports"
        rule = _Filter(
            None if allowed is None else np.asarray(allowed, dtype=bool),
            reports if require_report is None else bool(require_report),
            reports if per_study is None else bool(per_study),
            self.one_per_patient if per_patient is None else bool(per_patient),
        )
        backend = self.backend(target)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        out_ids = np.full((nq, k), -1, dtype=np.int64)
        # Over-fetch for exclusions and per-study de-duplication; widen until k usable rows or all rows.
        fetch = min(n, k * (4 if rule.per_study or rule.per_patient else 1) + (16 if any(pats) or any(studs) else 0))
        if rule.allowed is not None:  # a filter keeping a fraction f of the rows needs about 1/f times the rows
            fetch = min(n, int(fetch * n / max(1, int(rule.allowed.sum()))))
        todo = np.arange(nq)
        while len(todo):
            scores, ids = backend.search(queries[todo], fetch)
            if self._bounded:
                check_scores(scores, ids, self.index.file(target), np.linalg.norm(queries[todo], axis=1))
            again = []
            for j, q in enumerate(todo):
                keep = self._keep(ids[j], pats[q], studs[q], rule)
                if len(keep) >= k or fetch >= n:
                    keep = keep[:k]
                    pos = {r: i for i, r in enumerate(ids[j].tolist())}
                    out_ids[q, : len(keep)] = keep
                    out_scores[q, : len(keep)] = scores[j, [pos[r] for r in keep.tolist()]]
                else:
                    again.append(q)
            todo = np.asarray(again, dtype=np.int64)
            fetch = min(n, fetch * 4)
        return out_scores, out_ids

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 5,
        target: str = "reports",
        exclude_patients: Sequence[str | None] | None = None,
        exclude_studies: Sequence[str | None] | None = None,
        allowed: np.ndarray | None = None,
    ) -> list[pd.DataFrame]:
        """Top-k rows for each query vector, with per-query exclusions (None = none); one frame per query."""
        scores, ids = self.search_ids(queries, k, target, exclude_patients, exclude_studies, allowed)
        return [self._frame(i[i >= 0], s[i >= 0]) for s, i in zip(scores, ids, strict=True)]

    def column(self, name: str) -> np.ndarray:
        """Meta column `name` as a numpy array, taken once per Searcher: indexing it per query is what a result
        needs, where `meta.iloc[rows]` took each Arrow-backed column apart per query (~1-10 ms)."""
        if name not in self._columns:
            self._columns[name] = self.index.meta[name].to_numpy()
        return self._columns[name]

    def _frame(self, keep: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
        # One DataFrame constructor (inserting the columns one by one cost ~10x more per interactive query).
        cols = {
            "rank": np.arange(1, len(keep) + 1),
            "score": np.asarray(scores, dtype=np.float32),
            "row_id": keep.astype(np.int64),
        }
        cols.update({col: self.column(col)[keep] for col in RESULT_COLUMNS[3:]})
        cols["labels"] = [list(x) if x is not None else [] for x in cols["labels"]]
        return pd.DataFrame(cols, columns=RESULT_COLUMNS)

    def query_vector(
        self,
        vector: np.ndarray,
        k: int = 5,
        target: str = "reports",
        exclude_patient: str | None = None,
        exclude_study: str | None = None,
    ) -> pd.DataFrame:
        """Top-k rows for one query vector."""
        return self.search_vectors(vector, k, target, [exclude_patient], [exclude_study])[0]

    def match(self, vector: np.ndarray, modality: str = "image", exclude_patient: str | None = None) -> dict | None:
        """Whether a query vector has a close match in the collection: {"close", "closeness", "threshold",
        "quantile"} under the threshold calibrated at build time (index/abstain.py); None for an index built
        without one."""
        found = self.matches(vector, modality, [exclude_patient])
        return None if found is None else found[0]

    def matches(
        self, vectors: np.ndarray, modality: str = "image", exclude_patients: Sequence[str | None] | None = None
    ) -> list[dict] | None:
        """`match` for many query vectors at once."""
        record = (self.index.info.get("abstain") or {}).get(modality)
        if not record:
            return None
        n = int(record.get("neighbours", 1))
        target = abstain.MODALITIES[modality]
        scores, _ = self.search_ids(vectors, n, target, exclude_patients, per_study=False, per_patient=False)
        return [abstain.judge(record, float(np.mean(row))) for row in scores]

    def image_vector(self, image: str | Path | np.ndarray) -> np.ndarray:
        """(1, dim) embedding of one image (path or HxW float array in [0, 1]) with the index's model."""
        from retrieval.models.image_stream import encode_image_items

        vector, _, _ = encode_image_items(self._need_model(), [image], output="embeddings", on_error="raise")
        return vector

    def query_image(
        self,
        image: str | Path | np.ndarray,
        k: int = 5,
        target: str = "reports",
        exclude_patient: str | None = None,
        exclude_study: str | None = None,
    ) -> pd.DataFrame:
        """Top-k rows for an image (path to PNG/JPEG/DICOM, or an HxW float array in [0, 1])."""
        return self.query_vector(self.image_vector(image), k, target, exclude_patient, exclude_study)

    def query_text(
        self,
        text: str,
        k: int = 5,
        target: str = "reports",
        exclude_patient: str | None = None,
        exclude_study: str | None = None,
        findings: str = "auto",
    ) -> pd.DataFrame:
        """Top-k rows for a sentence (e.g. 'right lower lobe consolidation'); `findings="auto"` keeps to reports
        that have the findings the sentence names (index/report_findings.py), "off" ranks by the embedding alone."""
        return self.text_results(self.text_vector(text), text, k, target, exclude_patient, exclude_study, findings)

    def text_vector(self, text: str) -> np.ndarray:
        """(1, dim) embedding of one sentence with the index's model (UsageError when it is empty)."""
        if not str(text).strip():
            raise UsageError("the text query is empty")
        check_query_text(str(text))
        return np.asarray(self._need_model().encode_texts([str(text)]), dtype=np.float32)

    def text_results(
        self,
        vector: np.ndarray,
        text: str,
        k: int = 5,
        target: str = "reports",
        exclude_patient: str | None = None,
        exclude_study: str | None = None,
        findings: str = "auto",
    ) -> pd.DataFrame:
        """The results of a text query whose embedding is `vector` (see `query_text`)."""
        from index import report_findings as rf

        if findings not in rf.MODES:
            raise UsageError(f"findings must be one of {', '.join(rf.MODES)}, got {findings!r}")
        want = rf.query_findings(text) if findings == "auto" else frozenset()
        if not want:
            return self.query_vector(vector, k, target, exclude_patient, exclude_study)
        if self._row_findings is None:
            self._row_findings = rf.row_findings(self.index.meta)
        mask = rf.rows_with(self._row_findings, want)
        found = self.search_vectors(vector, k, target, [exclude_patient], [exclude_study], allowed=mask)[0]
        if len(found) < k:  # too few reports have them all: the plain ranking fills up
            plain = self.query_vector(vector, k + len(found), target, exclude_patient, exclude_study)
            key = "study_id" if target == "reports" else "row_id"
            found = pd.concat([found, plain[~plain[key].isin(found[key])]], ignore_index=True).head(k)
            found["rank"] = np.arange(1, len(found) + 1)
        return found

    def query_images(
        self,
        paths: Sequence[str],
        k: int = 5,
        target: str = "reports",
        exclude_patients: Sequence[str | None] | None = None,
        batch_size: int = 64,
        workers: int = 2,
        progress: bool = True,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Many image queries, decoded in worker processes: (results with a `query` column, bad images). Each
        result row also says whether its query had a close match (`close_match`, `closeness`: see `match`)."""
        from index.encode import stream_image_vectors
        from retrieval.progress import make_progress

        model = self._need_model()
        paths = [str(p) for p in paths]
        pats = list(exclude_patients) if exclude_patients is not None else [None] * len(paths)
        batches = [list(range(i, min(len(paths), i + batch_size))) for i in range(0, len(paths), batch_size)]
        frames, bad = [], []
        with make_progress(disable=not progress) as bar:
            task = bar.add_task("Querying images", total=len(paths), unit="images")
            for ids, vecs, bad_rows in stream_image_vectors(paths, model, batches, workers=workers):
                if len(ids):
                    found = self.search_vectors(vecs, k, target, [pats[i] for i in ids])
                    judged = self.matches(vecs, "image", [pats[i] for i in ids]) or [{}] * len(ids)
                    for i, frame, match in zip(ids.tolist(), found, judged, strict=True):
                        frame.insert(0, "query", paths[i])
                        frame["close_match"] = match.get("close", True)  # True where the index has no threshold
                        frame["closeness"] = match.get("closeness", np.nan)
                        frames.append(frame)
                bad.extend({"path": paths[i], "reason": r} for i, r in bad_rows)
                bar.advance(task, len(ids) + len(bad_rows))
        results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["query", *RESULT_COLUMNS])
        return results, pd.DataFrame(bad, columns=["path", "reason"])



def result_records(frame: pd.DataFrame) -> list[dict]:
    """Result rows as JSON records, as `cxr query --json` and the HTTP API give them (score rounded to 6 places,
    labels as strings, rank and row_id as ints)."""
    out = []
    for r in frame.to_dict("records"):
        r["score"] = round(float(r["score"]), 6)
        r["labels"] = [str(x) for x in r["labels"]]
        out.append({k: (int(v) if k in ("rank", "row_id") else v) for k, v in r.items()})
    return out
