"""split_positions (retrieval/data/split_items.py): the one manifest -> split rows step of retrieval training and
evaluation, the VLM's training and evaluation, and the image-text-to-text fine-tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrieval.data.split_items import split_positions
from retrieval.errors import ManifestError

SPLITS = st.lists(st.sampled_from(["train", "val", "test", ""]), min_size=1, max_size=40)


@given(SPLITS, st.sampled_from(["train", "test"]))
def test_the_positions_are_the_naive_masks_in_manifest_order(splits, split):
    df = pd.DataFrame({"split": splits, "image_id": [f"i{i}" for i in range(len(splits))]})
    want = np.flatnonzero((df["split"] == split).to_numpy()).tolist()
    if want:
        assert split_positions(df, split) == want
    else:
        with pytest.raises(ManifestError, match=rf"no rows in split '{split}' \(splits present: \["):
            split_positions(df, split)
    assert split_positions(df, None) == list(range(len(df)))


def test_a_missing_split_names_the_splits_present_and_a_missing_column_says_so():
    df = pd.DataFrame({"split": ["train", "test", "train"]})
    with pytest.raises(ManifestError, match=r"no rows in split 'val' \(splits present: \['test', 'train'\]\)"):
        split_positions(df, "val")
    with pytest.raises(ManifestError, match="no split column"):
        split_positions(pd.DataFrame({"image_id": ["a"]}), "train")
    with pytest.raises(ManifestError, match="no rows in split None"):
        split_positions(pd.DataFrame({"split": []}), None)
