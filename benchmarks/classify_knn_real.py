"""Can the retrieved neighbours' labels answer `[classify]` on a small real set? A k-NN vote over the image index,
against the constant, chosen by cross-validation on the training images and then scored on the test split.

    python -m benchmarks.classify_knn_real --manifest M --index I --name covid

M is an imported manifest with its patient-disjoint splits, I an index of its train(+val) images. Every
train+val image queries the training images (never its own patient or study): that cross-validated macro-F1 over
hundreds of images picks the rule and k; the test split (tens of images) is then scored for every rule, so the
table shows how far a test figure can move on a handful of minority images. Rules: `majority` (most neighbours),
`soft` (votes weighted by exp(score / 0.05)), `balanced` (each class's vote share over its training prevalence).
Results: benchmarks/results/classify_knn_NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine_info

RULES = ("majority", "soft", "balanced")
KS = (1, 3, 5, 7, 10, 15)


def vote(scores: np.ndarray, classes: list[str], rule: str, prior: dict[str, float]) -> str:
    """The class the neighbours (scores best first, their classes) vote for under `rule`."""
    w = np.exp((scores - scores.max()) / 0.05) if rule == "soft" else np.ones(len(scores))
    votes: Counter = Counter()
    for wi, c in zip(w / w.sum(), classes, strict=True):
        votes[c] += wi
    if rule == "balanced":
        return max(votes, key=lambda c: votes[c] / prior.get(c, 1.0))
    return max(votes, key=votes.get)


def main() -> None:
    from generation.data.features import open_searcher
    from generation.data.rag import retrieve_exemplars
    from generation.data.tasks import classify_target
    from generation.evaluation.metrics import multilabel_prf
    from retrieval.data.manifest import read_manifest

    p = argparse.ArgumentParser()
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    df = read_manifest(args.manifest).reset_index(drop=True)
    searcher = open_searcher(args.index)
    model = searcher.index.load_model()
    rows = np.flatnonzero(df["split"].isin(["train", "val", "test"]).to_numpy())
    vecs = np.asarray(model.encode_images([str(x) for x in df["image_path"].iloc[rows]]), dtype=np.float32)
    vec_of = dict(zip(rows.tolist(), vecs, strict=True))
    truth = [classify_target(labels) for labels in df["labels"]]
    index_class = [classify_target(labels) for labels in searcher.column("labels")]
    train = np.flatnonzero((df["split"] == "train").to_numpy())
    counts = Counter(truth[r] for r in train)
    prior = {c: n / len(train) for c, n in counts.items()}
    train_studies = {str(x) for x in df["study_id"].iloc[train]}
    study_class = dict(zip((str(x) for x in searcher.column("study_id")), index_class, strict=True))

    def neighbours(part: np.ndarray) -> list[tuple[np.ndarray, list[str]]]:
        """Each query's neighbours among the training studies (rag.retrieve_exemplars: never its own study or
        patient, one per study), as (scores best first, their classes)."""
        studies, patients = ([str(x) for x in df[c].iloc[part]] for c in ("study_id", "patient_id"))
        vecs = np.stack([vec_of[r] for r in part])
        found = retrieve_exemplars(searcher, vecs, max(KS), studies, patients, train_studies, target="images")
        return [(np.array([e.score for e in exs]), [study_class[e.study_id] for e in exs]) for exs in found]

    def macro(part: np.ndarray, answers: list[str]) -> float:
        return multilabel_prf([truth[r].split(", ") for r in part], [a.split(", ") for a in answers])["macro_f1"]

    parts = {
        "cv": np.flatnonzero(df["split"].isin(["train", "val"]).to_numpy()),
        "test": np.flatnonzero((df["split"] == "test").to_numpy()),
    }
    found = {name: neighbours(part) for name, part in parts.items()}
    constant = max(counts, key=counts.get)
    table = [{"rule": "constant", "k": None, **{n: macro(part, [constant] * len(part)) for n, part in parts.items()}}]
    for rule in RULES:
        for k in KS:
            row = {"rule": rule, "k": k}
            for name, part in parts.items():
                answers = [vote(scores[:k], classes[:k], rule, prior) for scores, classes in found[name]]
                row[name] = macro(part, answers)
            table.append(row)
    best = max(table[1:], key=lambda r: r["cv"])
    result = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "classes": {n: dict(Counter(truth[r] for r in part)) for n, part in parts.items()},
        "chosen_by_cv": best,
        "rows": table,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"classify_knn_{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    lines = ["| rule | k | cross-validated macro-F1 (train+val) | test macro-F1 |", "|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['k'] or '-'} | {r['cv']:.3f} | {r['test']:.3f} |" for r in table]
    text = "\n".join(lines) + f"\n\nchosen by cross-validation: {best}\nclasses: {result['classes']}\n"
    (RESULTS / f"classify_knn_{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
