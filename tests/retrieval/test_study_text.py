"""retrieval/study_text.py: a row's report text, sentence splitting, the readings of sentences, shared sentences.

The splitter is checked against the rule it replaced (`(?<=[.!?])\\s+|\\n+`, which the labeler, RAG and the quoted
sentences all used) on every text where that rule was right, and on the cases it cut wrongly: decimals ("1.5 cm"),
abbreviations ("Dr. Smith", "e.g.") and numbered lists. Linear cost is `tests/system/test_text_cost.py`'s.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.labels import label_report, label_report_detailed
from retrieval.study_text import (
    ABBREVIATIONS,
    clean_sentences,
    first_sentence,
    matched_report_sentences,
    normalized_sentences,
    report_text,
    sections_text,
    sentence_key,
    shared_sentences,
    split_sentences,
    whole_sentences,
)

OLD_RULE = re.compile(r"(?<=[.!?])\s+|\n+")


def old_split(text: str) -> list[str]:
    """The rule every splitter but the viewer's used before: cut after . ! ? and white space, or at line breaks."""
    return [s.strip() for s in OLD_RULE.split(text) if re.search(r"\w", s)]


# ---------------------------------------------------------------------------------------------- report text


def test_report_text_prefers_the_report_and_sections_text_the_sections():
    row = {"report": " Whole report. ", "findings": "Findings.", "impression": "Impression."}
    assert report_text(row) == "Whole report."
    assert sections_text(row) == "Findings. Impression."
    only_sections = {"report": "", "findings": " Clear lungs. ", "impression": None}
    assert report_text(only_sections) == sections_text(only_sections) == "Clear lungs."
    only_report = pd.Series({"report": "No effusion.", "findings": float("nan"), "impression": ""})
    assert report_text(only_report) == sections_text(only_report) == "No effusion."
    assert report_text({"report": float("nan")}) == "" and report_text({}) == ""  # NaN is no text, not "nan"


# ---------------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("A 1.5 cm nodule. No effusion.", ["A 1.5 cm nodule.", "No effusion."]),
        ("Discussed with Dr. Smith on the ward.", ["Discussed with Dr. Smith on the ward."]),
        ("Devices, e.g. a pacemaker, i.e. leads. Clear.", ["Devices, e.g. a pacemaker, i.e. leads.", "Clear."]),
        ("1. Small effusion. 2. No pneumothorax.", ["1. Small effusion.", "2. No pneumothorax."]),
        ("IMPRESSION: 1. No acute process. 12. Stable.", ["IMPRESSION: 1. No acute process.", "12. Stable."]),
        ("Heart normal\n1. Clear lungs.", ["Heart normal", "1. Clear lungs."]),
        ("It measures 2. Next sentence.", ["It measures 2.", "Next sentence."]),  # a number inside: an end
        ("Really? Yes! Dr.\nSmith", ["Really?", "Yes!", "Dr.", "Smith"]),  # a line break always ends one
        ("upper lobe.There is scarring.", ["upper lobe.", "There is scarring."]),  # no space, then a capital
        ("a. b! c? {<1><2><3><4>}", ["a.", "b!", "c?", "{<1><2><3><4>}"]),
        ("No effusion. ... ", ["No effusion."]),  # pieces without a word are dropped
        ("", []),
        (None, []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


WORDS = ["the", "lungs", "are", "clear", "No", "effusion", "Heart", "size", "x-ray", "1.5", "cm", "XXXX", "(left)"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from([" ", " ", ". ", "! ", "? ", "\n", ".\n", ", "]))))
def test_split_matches_the_old_rule_where_it_was_right(pieces):
    """Without abbreviations, list numbers or a capital right after a period, nothing changed."""
    text = "".join(w + sep for w, sep in pieces)
    assert split_sentences(text) == old_split(text)


def test_real_reports_split_as_before_unless_the_old_rule_was_wrong():
    from retrieval.data.importers.iu_xray import builtin_reports_path, read_iu_reports

    if not builtin_reports_path().is_file():
        pytest.skip("torchxrayvision's NLMCXR_reports.tgz is not installed")
    texts = [report_text(r) for r in read_iu_reports()]
    abbreviations = "|".join(re.escape(a) for a in ABBREVIATIONS)
    wrong = re.compile(rf"(?i:\b(?:{abbreviations})\.\s)|(?:^|[.!?:\n]\s*)\d{{1,2}}\.\s|[a-z][.!?][A-Z]")
    right = [t for t in texts if not wrong.search(t)]
    assert len(right) > 3000 and len(texts) - len(right) > 100  # both kinds are common
    assert [split_sentences(t) for t in right] == [old_split(t) for t in right]
    # where it was wrong, the labels stay what they were: the old cuts fell between words no cue reaches across
    changed = [t for t in texts if wrong.search(t)]
    old_labels = [_old_label_report_detailed(t) for t in changed]
    assert [label_report_detailed(t) for t in changed] == old_labels


def _old_label_report_detailed(text: str) -> dict[str, str]:
    """The labeler over the old rule's sentences (a naive reference of its sentence loop)."""
    from retrieval.labels import _RANK, label_sentence
    from retrieval.study_text import clean_text

    out: dict[str, str] = {}
    for sentence in OLD_RULE.split(clean_text(text)):
        for label, status in label_sentence(sentence).items():
            if label not in out or _RANK[status] > _RANK[out[label]]:
                out[label] = status
    return out


def test_the_labeler_reads_numbered_lists_and_abbreviations():
    assert label_report("1. No pleural effusion. 2. Cardiomegaly.") == ["Cardiomegaly"]
    assert label_report("Findings discussed with Dr. Smith. No pneumothorax.") == ["No Finding"]
    assert clean_sentences("1. No XXXX effusion.  2. Clear.") == ["1. no effusion.", "2. clear."]


# ---------------------------------------------------------------------------------------------- readings


def test_whole_sentences_drop_deidentified_sentences_and_list_numbers():
    text = "1. The XXXX are normal. 2. No effusion.\nDr. Smith called."
    assert whole_sentences(text) == ["no effusion.", "dr. smith called."]
    assert whole_sentences("Normal chest x-XXXX. 1.") == ["normal chest x-ray."]


def test_normalized_sentences():
    assert normalized_sentences("1. No  effusion.  2. Lungs are clear.\nHeart OK") == [
        "no effusion",
        "lungs are clear",
        "heart ok",
    ]
    # no bare list numbers as sentences: the old rule's "1", "2" matched in any two numbered reports
    assert normalized_sentences("1. Clear. 2. No effusion.") == ["clear", "no effusion"]


def test_first_sentence():
    assert first_sentence("A 1.5 cm nodule. No effusion.") == "A 1.5 cm nodule."
    assert first_sentence("   ") == ""


# ---------------------------------------------------------------------------------------------- shared sentences


def test_shared_sentences_ignore_list_numbers_case_and_punctuation():
    report = "1. Small right pleural effusion. 2. No pneumothorax."
    assert shared_sentences("small right pleural effusion. the heart is enlarged.", report) == [
        "small right pleural effusion."
    ]
    assert matched_report_sentences("No pneumothorax!", report) == ["2. No pneumothorax."]
    assert sentence_key("2. No Pneumothorax!") == "no pneumothorax"
    assert shared_sentences("A 1.5 cm nodule.", "There is a 1.5 cm nodule in the left lung.") == ["A 1.5 cm nodule."]


def test_shared_sentences_as_the_viewer_highlights_them():
    text = "the heart is enlarged. there is a right pleural effusion. no pneumothorax."
    report = "There is a right pleural effusion.  The lungs are otherwise clear.\nNo pneumothorax"
    assert shared_sentences(text, report) == ["there is a right pleural effusion.", "no pneumothorax."]
    clause = "The lungs are clear, and without focal airspace opacity. No effusion."
    assert shared_sentences("the lungs are clear. no.", clause) == ["the lungs are clear."]  # words in a row
    assert matched_report_sentences("the lungs are clear.", clause) == [
        "The lungs are clear, and without focal airspace opacity."
    ]
    assert shared_sentences("lungs clear.", "The lungs are clear.") == []  # not the same words in a row
    assert split_sentences("a. b! c? {<1><2><3><4>}") == ["a.", "b!", "c?", "{<1><2><3><4>}"]
