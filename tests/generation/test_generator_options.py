"""GeneratorOptions (generation/writing/generator_options.py): the five answer sources, checked in one place."""

from __future__ import annotations

import dataclasses

import pytest

from generation.writing.generator_options import ALLOWED, GeneratorOptions
from retrieval.errors import UsageError


def test_defaults_are_the_heads_and_the_written_report():
    opt = GeneratorOptions()
    assert dataclasses.asdict(opt) == {
        "vqa_source": "head",
        "report_source": "findings",
        "box_source": "head",
        "finding_source": "ridge",
        "classify_source": "head",
    }
    assert set(ALLOWED) == {f.name for f in dataclasses.fields(GeneratorOptions)}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_every_allowed_value_is_accepted_and_any_other_is_refused_by_name(name):
    for value in ALLOWED[name]:
        assert getattr(GeneratorOptions(**{name: value}), name) == value
    with pytest.raises(UsageError, match=f"^{name} must be one of .*'nope'"):
        GeneratorOptions(**{name: "nope"})


def test_replace_checks_like_the_constructor_and_leaves_the_original():
    opt = GeneratorOptions()
    lm = opt.replace(vqa_source="lm", report_source="generate")
    assert (lm.vqa_source, lm.report_source, lm.box_source) == ("lm", "generate", "head")
    assert opt == GeneratorOptions()
    with pytest.raises(UsageError, match="box_source"):
        opt.replace(box_source="detector")


def test_pop_from_takes_only_the_source_keys():
    settings = {"box_source": "lm", "constrain_boxes": False, "ks": "3", "vqa_source": "lm"}
    opt = GeneratorOptions.pop_from(settings)
    assert opt == GeneratorOptions(box_source="lm", vqa_source="lm")
    assert settings == {"constrain_boxes": False, "ks": "3"}
    assert GeneratorOptions.pop_from({}) == GeneratorOptions()
