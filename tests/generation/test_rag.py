"""RAG prompts: never the query's own study or patient, one exemplar per study, within the token budget."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generation.data.rag import Exemplar, build_prompt_ids, retrieve_exemplars
from generation.model.tokenizer import REF_TOKEN, TASK_TOKENS, build_tokenizer
from index.factory import build_from_vectors
from index.generations import save_index
from index.search import Searcher


def _index(tmp_path, vecs: np.ndarray, studies: list[str], patients: list[str], reports: list[str]):
    """A Flat index over `vecs` (images and reports alike) with these rows, and a Searcher on it."""
    n = len(vecs)
    meta = pd.DataFrame(
        {
            "row_id": np.arange(n),
            "image_id": [f"i{i}" for i in range(n)],
            "study_id": studies,
            "patient_id": patients,
            "image_path": [f"/x/{i}.png" for i in range(n)],
            "view": "PA",
            "report": reports,
            "labels": [["No Finding"]] * n,
            "split": "train",
            "source": "synthetic",
            "has_report": [bool(r) for r in reports],
        }
    )
    images, _ = build_from_vectors(vecs, "Flat")
    reps, _ = build_from_vectors(vecs, "Flat")
    info = {"factory": "Flat", "model": {"name": "none", "fingerprint": "abc"}}
    return Searcher(save_index(tmp_path / "idx", images, reps, meta, info)), meta


def naive_exemplars(vecs, q, meta, k, study=None, patient=None, allowed=None, require_report=True):
    """The reference (RAG's filter before it went through the Searcher): walk the full exact ranking, skip the
    query's study and patient, studies seen, rows without a report (when required) and studies not allowed."""
    sims = vecs @ q
    out, seen = [], set()
    for i in np.argsort(-sims, kind="stable"):
        r = meta.iloc[int(i)]
        report = str(r["report"]).strip()
        if r["study_id"] in seen or (require_report and not report):
            continue
        if (
            r["study_id"] == study
            or r["patient_id"] == patient
            or (allowed is not None and r["study_id"] not in allowed)
        ):
            continue
        seen.add(r["study_id"])
        out.append((r["study_id"], r["patient_id"], report))
        if len(out) == k:
            break
    return out


def unit(rng, n, d=8):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exemplars_exclude_own_study_and_patient_dedupe_and_skip_empty(tmp_path):
    # the case the old select_exemplars test pinned: rows 0, 1 are the query's study, 2 its patient, 6 has no text
    studies = ["s1", "s1", "s2", "s3", "s4", "s5", "s6"]
    patients = ["p1", "p1", "p1", "p2", "p3", "p3", "p4"]
    reports = ["own study", "own study", "own patient", "ok a", "ok b", "ok c", ""]
    q = np.zeros(8, dtype=np.float32)
    q[0] = 1
    # vectors ranked 0, 1, 2, 6, 3, 4, 5 against q
    order = [0, 1, 2, 6, 3, 4, 5]
    vecs = np.zeros((7, 8), dtype=np.float32)
    for rank, row in enumerate(order):
        angle = 0.1 * (rank + 1)
        vecs[row, 0], vecs[row, 1 + rank] = np.cos(angle), np.sin(angle)
    searcher, meta = _index(tmp_path, vecs, studies, patients, reports)
    qs = q[None]

    def ids(k, study=None, patient=None, allowed=None, target="reports"):
        got = retrieve_exemplars(searcher, qs, k, [study], [patient], allowed, target)[0]
        return [e.study_id for e in got]

    assert ids(3, "s1", "p1") == ["s3", "s4", "s5"]
    assert ids(10) == ["s1", "s2", "s3", "s4", "s5"]  # own study first, once only; the empty report skipped
    assert retrieve_exemplars(searcher, qs, 0, [None], [None]) == [[]]
    assert ids(3, "s1", "p1", allowed={"s4"}) == ["s4"]
    # image-to-image neighbours of a set without reports keep text-less studies
    assert ids(3, "s1", "p1", target="images") == ["s6", "s3", "s4"]
    ex = retrieve_exemplars(searcher, qs, 3, ["s1"], ["p1"], target="images")[0]
    assert [e.report for e in ex] == ["", "ok a", "ok b"]
    np.testing.assert_allclose([e.score for e in ex], vecs[[6, 3, 4]] @ q, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exemplars_equal_the_naive_filter_on_random_corpora(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = 300
    study_of = rng.integers(0, 120, n)
    studies = [f"s{s}" for s in study_of]
    patients = [f"p{s // 4}" for s in study_of]
    reports = ["" if rng.random() < 0.2 else f"report {s}" for s in study_of]
    vecs = unit(rng, n)
    searcher, meta = _index(tmp_path, vecs, studies, patients, reports)
    q = unit(rng, 12)
    qs = [studies[i] for i in rng.integers(0, n, 12)]
    qp = [patients[i] for i in rng.integers(0, n, 12)]
    allowed = {f"s{s}" for s in range(0, 120, 3)}
    for k, allow, target in [
        (5, None, "reports"),
        (4, allowed, "reports"),
        (6, None, "images"),
        (3, allowed, "images"),
    ]:
        got = retrieve_exemplars(searcher, q, k, qs, qp, allow, target)
        for j in range(len(q)):
            want = naive_exemplars(vecs, q[j], meta, k, qs[j], qp[j], allow, require_report=target == "reports")
            assert [(e.study_id, e.patient_id, e.report) for e in got[j]] == want


def test_retrieve_searches_deeper_when_exclusions_empty_the_first_page(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    studies = [f"s{i}" for i in range(n)]
    patients = ["p0"] * 190 + [f"p{i}" for i in range(190, n)]
    vecs = unit(rng, n)
    searcher, meta = _index(tmp_path, vecs, studies, patients, ["r"] * n)
    got = retrieve_exemplars(searcher, vecs[:2], 3, ["s0", "s1"], ["p0", "p0"])
    for q, ex in enumerate(got):
        assert len(ex) == 3
        assert all(e.patient_id != "p0" and e.study_id != f"s{q}" for e in ex)
        # naive reference: the 3 best-scoring rows of other patients
        s = vecs[q] @ vecs.T
        ref = [i for i in np.argsort(-s) if meta.patient_id[i] != "p0"][:3]
        assert [e.study_id for e in ex] == [f"s{i}" for i in ref]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(8, 200),
    st.lists(st.text(alphabet="abcdefgh ijk.", min_size=1, max_size=300), max_size=5),
    st.sampled_from(list(TASK_TOKENS)),
)
def test_token_budget_respected_and_task_prompt_kept(tok, budget, reports, task):
    prompt = "is there cardiomegaly?"
    exemplars = [Exemplar(f"s{i}", f"p{i}", 1.0, r) for i, r in enumerate(reports) if r.strip()]
    ids, used = build_prompt_ids(tok, task, prompt, exemplars, budget)
    frame = [tok.cls_token_id, tok.convert_tokens_to_ids(TASK_TOKENS[task])]
    frame += tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(frame)] == frame and ids[-1] == tok.sep_token_id
    assert len(ids) <= max(budget, len(frame) + 1)
    assert ids.count(tok.convert_tokens_to_ids(REF_TOKEN)) == len(used)
    assert used == exemplars[: len(used)]  # rank order kept


def test_task_prompt_never_truncated_even_over_budget(tok):
    long_prompt = "where is the " + "very " * 40 + "large effusion?"
    ids, used = build_prompt_ids(tok, "vqa", long_prompt, [Exemplar("s", "p", 1.0, "text")], budget=10)
    assert used == []
    assert ids[2:-1] == tok(long_prompt, add_special_tokens=False)["input_ids"]


def test_empty_exemplar_text_is_skipped(tok):
    ids, used = build_prompt_ids(tok, "identify", "describe.", [Exemplar("s", "p", 1.0, "")], budget=64)
    assert used == [] and REF_TOKEN not in tok.convert_ids_to_tokens(ids)


def test_exemplar_truncated_to_fill_budget(tok):
    ex = [Exemplar("s1", "p1", 0.9, "the heart is normal " * 20), Exemplar("s2", "p2", 0.8, "second")]
    ids, used = build_prompt_ids(tok, "report", "describe.", ex, budget=30)
    assert len(ids) == 30 and [e.study_id for e in used] == ["s1"]


def test_prompt_numbers_the_exemplars(tok):
    from generation.model.tokenizer import decode

    exs = [Exemplar("s1", "p1", 0.9, "heart is enlarged."), Exemplar("s2", "p2", 0.8, "lungs are clear.")]
    ids, used = build_prompt_ids(tok, "report", "describe the findings and impression.", exs, 160)
    text = decode(tok, ids)
    assert f"{REF_TOKEN} 1 : heart is enlarged" in text and f"{REF_TOKEN} 2 : lungs are clear" in text
    assert text.index("1 : heart") < text.index("2 : lungs")
    assert used == exs


def test_copied_sentences_name_the_exemplar():
    from generation.data.rag import copied_sentences

    exs = [Exemplar("s1", "p1", 0.9, "Heart is enlarged. No effusion."), Exemplar("s2", "p2", 0.8, "Lungs are clear.")]
    found = copied_sentences("the heart is enlarged. lungs are clear. no effusion.", exs)
    assert found == [
        {"ref": 1, "study_id": "s1", "sentences": ["no effusion"]},
        {"ref": 2, "study_id": "s2", "sentences": ["lungs are clear"]},
    ]
    assert copied_sentences("something else entirely.", exs) == []
