"""RAG prompts: never the query's own study or patient, one exemplar per study, within the token budget."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.generation.rag import Exemplar, build_prompt_ids, retrieve_exemplars, select_exemplars
from retrieval.generation.tokenizer import REF_TOKEN, TASK_TOKENS, build_tokenizer

META = pd.DataFrame(
    {
        "study_id": ["s1", "s1", "s2", "s3", "s4", "s5", "s6"],
        "patient_id": ["p1", "p1", "p1", "p2", "p3", "p3", "p4"],
        "report": ["own study", "own study", "own patient", "ok a", "ok b", "ok c", ""],
    }
)


def test_excludes_own_study_and_patient_dedupes_and_skips_empty():
    ids = np.array([0, 1, 2, 6, 3, 4, 5])
    scores = np.linspace(1, 0.4, 7)
    ex = select_exemplars(scores, ids, META, 3, query_study="s1", query_patient="p1")
    assert [e.study_id for e in ex] == ["s3", "s4", "s5"]
    assert all(e.patient_id != "p1" for e in ex)
    # without exclusions: own study first, once only; the empty report is skipped
    ex = select_exemplars(scores, ids, META, 10)
    assert [e.study_id for e in ex] == ["s1", "s2", "s3", "s4", "s5"]
    assert select_exemplars(scores, ids, META, 0) == []
    ex = select_exemplars(scores, ids, META, 3, "s1", "p1", allowed_studies={"s4"})
    assert [e.study_id for e in ex] == ["s4"]
    # image-to-image neighbours of a set without reports keep text-less studies
    ex = select_exemplars(scores, ids, META, 3, "s1", "p1", require_report=False)
    assert [e.study_id for e in ex] == ["s6", "s3", "s4"]


def test_retrieve_searches_deeper_when_exclusions_empty_the_first_page():
    rng = np.random.default_rng(0)
    n = 200
    meta = pd.DataFrame(
        {
            "study_id": [f"s{i}" for i in range(n)],
            "patient_id": ["p0"] * 190 + [f"p{i}" for i in range(190, n)],
            "report": ["r"] * n,
        }
    )
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    calls = []

    def search(q, depth):
        calls.append(depth)
        s = q @ vecs.T
        order = np.argsort(-s, axis=1)[:, :depth]
        return np.take_along_axis(s, order, 1), order

    got = retrieve_exemplars(search, vecs[:2], meta, 3, ["s0", "s1"], ["p0", "p0"])
    for q, ex in enumerate(got):
        assert len(ex) == 3
        assert all(e.patient_id != "p0" and e.study_id != f"s{q}" for e in ex)
        # naive reference: the 3 best-scoring rows of other patients
        s = vecs[q] @ vecs.T
        ref = [i for i in np.argsort(-s) if meta.patient_id[i] != "p0"][:3]
        assert [e.study_id for e in ex] == [f"s{i}" for i in ref]
    assert len(calls) > 1  # the first page (28 rows) held only patient p0 for most queries


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
    from retrieval.generation.tokenizer import decode

    exs = [Exemplar("s1", "p1", 0.9, "heart is enlarged."), Exemplar("s2", "p2", 0.8, "lungs are clear.")]
    ids, used = build_prompt_ids(tok, "report", "describe the findings and impression.", exs, 160)
    text = decode(tok, ids)
    assert f"{REF_TOKEN} 1 : heart is enlarged" in text and f"{REF_TOKEN} 2 : lungs are clear" in text
    assert text.index("1 : heart") < text.index("2 : lungs")
    assert used == exs


def test_copied_sentences_name_the_exemplar():
    from retrieval.generation.rag import copied_sentences

    exs = [Exemplar("s1", "p1", 0.9, "Heart is enlarged. No effusion."), Exemplar("s2", "p2", 0.8, "Lungs are clear.")]
    found = copied_sentences("the heart is enlarged. lungs are clear. no effusion.", exs)
    assert found == [
        {"ref": 1, "study_id": "s1", "sentences": ["no effusion"]},
        {"ref": 2, "study_id": "s2", "sentences": ["lungs are clear"]},
    ]
    assert copied_sentences("something else entirely.", exs) == []
