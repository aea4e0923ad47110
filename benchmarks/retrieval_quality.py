"""Retrieval quality as a user meets it, with the baselines in the same run (issue: retrieval that reads the image).

demo (the demo corpus; its test split is the held-out set):
- image -> report as `cxr query` runs it: an index of the train+val studies (`build_index`), each test image a
  query (`Searcher.query_images`, top 5 reports, one per study). Label-overlap P@5 over all queries and over
  abnormal ones, and per finding (queries carrying F: overlap P@5, and P@5 of reports that carry F).
- within the test split: `evaluate_retrieval` image->report LP@5 (model, its untrained projector, random).
- text -> report: each finding's phrase ("pleural effusion", ...) queries the train+val reports; P@5 of reports
  carrying the finding, for the projected model and for raw MiniLM cosine on the same reports; and every test
  report as a query (label-overlap P@5).
Systems: cxr-small trained (each seed), cxr-small with its untrained projector, cxr-tiny trained as `cxr demo`
trained it (each seed), random vectors.

real (../shared/data): benchmarks/quality_real.py (same finding, same view, same lesion side; random ranking,
the image-free prior and shuffled answers in the same run; 95% bootstrap intervals).

Run:  .venv/bin/python -m benchmarks.retrieval_quality demo [--seeds 0 1 2]
      .venv/bin/python -m benchmarks.retrieval_quality real [--data ../shared/data]
Writes benchmarks/results/quality_demo.{json,md} or quality_real.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.common import machine_info, markdown_table, write_results

WORK = Path("/tmp/cxr-quality")
COMMAND = ".venv/bin/python -m benchmarks.retrieval_quality"
# (finding, phrase): one short phrase per finding, as a user would type it. Enlarged Cardiomediastinum has two: the
# radiologist's "widened mediastinum" (what the demo's MeSH labels call it: Mediastinum/widened) and the CheXpert
# class name, whose reports the MeSH indexers mostly filed under Cardiomegaly ("enlarged cardiomediastinal silhouette").
FINDING_PHRASES = [
    ("Cardiomegaly", "cardiomegaly"),
    ("Lung Opacity", "lung opacity"),
    ("Lung Lesion", "pulmonary nodule"),
    ("Edema", "pulmonary edema"),
    ("Consolidation", "consolidation"),
    ("Pneumonia", "pneumonia"),
    ("Atelectasis", "atelectasis"),
    ("Pneumothorax", "pneumothorax"),
    ("Pleural Effusion", "pleural effusion"),
    ("Pleural Other", "pleural thickening"),
    ("Fracture", "rib fracture"),
    ("Support Devices", "sternotomy wires"),
    ("Enlarged Cardiomediastinum", "widened mediastinum"),
    ("Enlarged Cardiomediastinum", "enlarged cardiomediastinum"),
    ("No Finding", "no acute cardiopulmonary abnormality"),
]
NO_FINDING = "No Finding"


# ------------------------------------------------------------------------------------------ shared pieces


def topk_overlap(
    q_labels: list[list[str]], g_labels: list[list[str]], scores: np.ndarray, k: int = 5
) -> list[list[list[str]]]:
    """The label lists of each query's top-k gallery items (numpy ranking, for systems without an index)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[g_labels[j] for j in row] for row in order]


def label_precision(q_labels: list[list[str]], retrieved: list[list[list[str]]]) -> dict[str, Any]:
    """Overlap P@k over all / abnormal queries, and per finding (overlap P@k and "carries F" P@k)."""
    overlap, abnormal, per = [], [], {}
    for q, got in zip(q_labels, retrieved, strict=True):
        qs = set(q)
        hits = [bool(qs & set(g)) for g in got]
        p = float(np.mean(hits)) if hits else 0.0
        overlap.append(p)
        if qs - {NO_FINDING}:
            abnormal.append(p)
        for f in qs - {NO_FINDING}:
            row = per.setdefault(f, {"queries": 0, "overlap": [], "carries": []})
            row["queries"] += 1
            row["overlap"].append(p)
            row["carries"].append(float(np.mean([f in g for g in got])) if got else 0.0)
    per_out = {
        f: {
            "queries": r["queries"],
            "P@5 overlap": float(np.mean(r["overlap"])),
            "P@5 carries": float(np.mean(r["carries"])),
        }
        for f, r in sorted(per.items(), key=lambda kv: -kv[1]["queries"])
    }
    return {
        "P@5 all": float(np.mean(overlap)),
        "P@5 abnormal": float(np.mean(abnormal)) if abnormal else float("nan"),
        "queries": len(overlap),
        "abnormal_queries": len(abnormal),
        "per_finding": per_out,
    }


def _table(columns: list[str], rows: list[list[str]]) -> str:
    return markdown_table([dict(zip(columns, r, strict=True)) for r in rows], columns)


# ------------------------------------------------------------------------------------------ demo


def _query_index(model: Any, model_path: Path | None, gallery: pd.DataFrame, test: pd.DataFrame, index_dir: Path):
    from index.build import BuildOptions, build_index
    from index.search import Searcher
    from index.store import has_index

    if not has_index(index_dir):
        build_index(gallery, model, index_dir, options=BuildOptions(model_path=model_path, progress=False))
    searcher = Searcher(index_dir, model)
    paths = [str(Path(gallery.attrs["root"]) / p) for p in test["image_path"]]
    results, bad = searcher.query_images(paths, k=5, target="reports", progress=False)
    assert not len(bad), bad
    by_query = {q: list(g["labels"]) for q, g in results.groupby("query", sort=False)}
    retrieved = [[list(x) for x in by_query[p]] for p in paths]
    return retrieved, searcher


def _text_queries(model: Any, reports: list[str], labels: list[list[str]], raw: bool) -> dict[str, Any]:
    """Each finding's phrase against the gallery reports: P@5 of reports that carry it (projected or raw MiniLM)."""
    pairs = [(f, p) for f, p in FINDING_PHRASES if any(f in ls for ls in labels)]
    phrases = [p for _, p in pairs]
    if raw:
        gal = _raw_text(model, reports)
        qv = _raw_text(model, phrases)
    else:
        gal = model.encode_texts(reports)
        qv = model.encode_texts(phrases)
    order = np.argsort(-(qv @ gal.T), axis=1, kind="stable")[:, :5]
    return {p: float(np.mean([f in labels[j] for j in row])) for (f, p), row in zip(pairs, order, strict=True)}


def _text_queries_as_cxr_query(searcher: Any) -> dict[str, float]:
    """Each finding's phrase through `Searcher.query_text` as `cxr query --text` runs it (findings-aware: the
    labeler reads phrase and reports; index/report_findings.py): P@5 of returned reports carrying the finding."""
    meta_labels = set(x for ls in searcher.index.meta["labels"] for x in ls)
    out = {}
    for f, phrase in FINDING_PHRASES:
        if f in meta_labels:
            hits = searcher.query_text(phrase, k=5, target="reports")
            out[phrase] = float(np.mean([f in list(ls) for ls in hits["labels"]])) if len(hits) else 0.0
    return out


def _raw_text(model: Any, texts: list[str]) -> np.ndarray:
    """Raw MiniLM sentence vectors (the text tower's pooled output, L2-normalised), no projector."""
    import torch

    from retrieval.models import text_features

    with torch.no_grad():
        feats = text_features.pooled_features(
            lambda chunk: model.text_features(model.tokenize(chunk)), texts, 64, show_progress=False
        )
    v = feats.float().numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run_demo(seeds: list[int], epochs: int, tiny_epochs: int, tiny_seeds: list[int]) -> dict[str, Any]:
    from retrieval.data.demo import build_demo_corpus
    from retrieval.evaluate_retrieval import evaluate_retrieval, random_embeddings
    from retrieval.models import load_model
    from retrieval.training import train
    from serve.demo_pipeline import DEFAULT_WORKDIR, DEMO_SIZE

    manifest = build_demo_corpus(DEFAULT_WORKDIR / "corpus", size=DEMO_SIZE, seed=0, show_progress=False)
    manifest.attrs.setdefault("root", str(DEFAULT_WORKDIR / "corpus"))
    gallery = manifest[manifest["split"].isin(["train", "val"])]
    gallery.attrs["root"] = manifest.attrs["root"]
    test = manifest[(manifest["split"] == "test") & (manifest["report"].str.len() > 0)]
    q_labels = [list(x) for x in test["labels"]]
    studies = gallery.drop_duplicates("study_id")
    g_reports, g_labels = list(studies["report"]), [list(x) for x in studies["labels"]]

    systems: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    cache = WORK / "feature_cache"  # frozen towers' features, computed once and shared by every seed

    def measure(name: str, model: Any, model_path: Path | None, index_dir: Path, raw_text: bool = False) -> None:
        t0 = time.perf_counter()
        retrieved, searcher = _query_index(model, model_path, gallery, test, index_dir)
        row = label_precision(q_labels, retrieved)
        row["within_test_i2r_LP@5"] = evaluate_retrieval(model, manifest, "test", baselines=False)["systems"]["model"][
            "metrics"
        ]["image->report"]["LP@5"]
        row["text_phrase_P@5"] = _text_queries(model, g_reports, g_labels, raw=False)
        row["text_phrase_P@5_cxr_query"] = _text_queries_as_cxr_query(searcher)
        if raw_text:
            row["text_phrase_P@5_raw_minilm"] = _text_queries(model, g_reports, g_labels, raw=True)
        systems[name] = row
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: P@5 all {row['P@5 all']:.3f}, abnormal {row['P@5 abnormal']:.3f}", flush=True)

    def trained(base: str, short: str, n_epochs: int, seed: int, raw_text: bool = False) -> Path:
        """Train `base` on the demo corpus (as `cxr demo` does), time it, measure it; returns its folder."""
        out = WORK / f"demo-{short}-s{seed}"
        t0 = time.perf_counter()
        model = train(manifest, base, out, epochs=n_epochs, seed=seed, show_progress=False, cache_dir=str(cache)).model
        timings[f"train {base} s{seed}"] = round(time.perf_counter() - t0, 1)
        measure(f"{base} trained (seed {seed})", model, out, WORK / f"idx-{short}-s{seed}", raw_text=raw_text)
        return out

    for seed in seeds:
        out = trained("cxr-small", "small", epochs, seed, raw_text=seed == seeds[0])
        untrained = load_model("cxr-small", seed=seed)
        untrained.source_dir = out  # same frozen towers: the trained folder's feature stores are valid for it too
        measure(f"cxr-small untrained projector (seed {seed})", untrained, None, WORK / f"idx-small-zs-s{seed}")
        if seed in tiny_seeds:  # cxr-tiny as `cxr demo` trained it before cxr-small
            trained("cxr-tiny", "tiny", tiny_epochs, seed)
        # random vectors: the same queries against one vector per study, ranked by numpy
        qv, gv = random_embeddings(len(test), len(studies), 256, seed)
        row = label_precision(q_labels, topk_overlap(q_labels, g_labels, qv @ gv.T))
        systems[f"random vectors (seed {seed})"] = row
    return {"systems": systems, "timings_s": timings, "test_queries": len(test), "gallery_studies": len(studies)}


def _mean_rows(systems: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and spread over seeds of each system's headline figures."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, row in systems.items():
        groups.setdefault(name.split(" (seed")[0], []).append(row)
    out = {}
    for name, rows in groups.items():
        out[name] = {}
        for key in ("P@5 all", "P@5 abnormal", "within_test_i2r_LP@5"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                out[name][key] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
    return out


def demo_markdown(result: dict[str, Any]) -> str:
    systems = result["systems"]
    lines = [
        "# Retrieval quality on the demo corpus",
        "",
        f"Queries: {result['test_queries']} test images (held out); gallery: an index of the "
        f"{result['gallery_studies']} train+val studies, searched as `cxr query` searches it (top 5 reports, one "
        "per study). P@5 = fraction of the top 5 reports sharing a label with the query (No Finding counts as a "
        "label). Targets: P@5 >= 0.70 over all queries, >= 0.50 over abnormal ones.",
        "",
        "## Headline (mean ± std over seeds)",
        "",
    ]
    rows = []
    for name, vals in _mean_rows(systems).items():
        cells = [name]
        for key in ("P@5 all", "P@5 abnormal", "within_test_i2r_LP@5"):
            if key in vals:
                m, s, n = vals[key]
                cells.append(f"{m:.3f} ± {s:.3f} (n={n})")
            else:
                cells.append("-")
        rows.append(cells)
    lines.append(_table(["system", "image->report P@5 (all)", "P@5 (abnormal)", "within-test i2r LP@5"], rows))
    first = next(n for n in systems if n.startswith("cxr-small trained"))
    tiny = next(n for n in systems if n.startswith("cxr-tiny trained"))
    rand = next(n for n in systems if n.startswith("random"))
    zs = next(n for n in systems if n.startswith("cxr-small untrained"))
    lines += ["", f"## Per finding ({first} vs baselines; findings with >= 10 test queries)", ""]
    per_rows = []
    for f, r in systems[first]["per_finding"].items():
        if r["queries"] < 10:
            continue
        cells = [f, str(r["queries"])]
        for sysname in (first, zs, tiny, rand):
            q = systems[sysname]["per_finding"].get(f)
            cells.append("-" if q is None else f"{q['P@5 overlap']:.2f} / {q['P@5 carries']:.2f}")
        per_rows.append(cells)
    columns = ["finding", "queries", "cxr-small trained", "untrained projector", "cxr-tiny", "random"]
    lines.append(_table(columns, per_rows))
    lines += ["", "Cells: overlap P@5 / P@5 of reports that carry the finding.", ""]
    lines += ["## Text -> report (finding phrase, P@5 of reports carrying it)", ""]
    proj, raw = systems[first]["text_phrase_P@5"], systems[first].get("text_phrase_P@5_raw_minilm", {})
    tiny_t = systems[tiny]["text_phrase_P@5"]
    cq = systems[first].get("text_phrase_P@5_cxr_query", {})
    t_rows = [
        [
            f,
            p,
            f"{cq.get(p, float('nan')):.2f}",
            f"{proj[p]:.2f}",
            f"{raw.get(p, float('nan')):.2f}",
            f"{tiny_t.get(p, 0):.2f}",
        ]
        for f, p in FINDING_PHRASES
        if p in proj
    ]
    t_rows.append(
        [
            "mean",
            "",
            f"{np.mean(list(cq.values())):.3f}",
            f"{np.mean(list(proj.values())):.3f}",
            f"{np.mean(list(raw.values())):.3f}",
            f"{np.mean(list(tiny_t.values())):.3f}",
        ]
    )
    columns = [
        "finding",
        "phrase",
        "cxr query --text (findings-aware)",
        "cxr-small embedding only",
        "raw MiniLM cosine",
        "cxr-tiny embedding only",
    ]
    lines.append(_table(columns, t_rows))
    lines += [
        "",
        "`cxr query --text` keeps to reports that the labeler reads as having the finding the phrase names "
        "(negation-aware), ranked by the embedding; the next columns rank all reports by the embedding alone.",
        "",
    ]
    lines += ["", f"Timings (s): {result['timings_s']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["demo", "real"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--tiny-epochs", type=int, default=2, help="as `cxr demo` trained cxr-tiny")
    ap.add_argument("--tiny-seeds", type=int, nargs="*", default=None, help="seeds for cxr-tiny [default: --seeds]")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.what == "demo":
        result = run_demo(a.seeds, a.epochs, a.tiny_epochs, a.seeds if a.tiny_seeds is None else a.tiny_seeds)
        result["machine"] = machine_info()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_results("quality_demo", result, demo_markdown(result), COMMAND + " demo")
    else:
        from benchmarks.quality_real import real_markdown, run_real

        result = run_real(a.data, a.epochs, WORK)
        result["machine"] = machine_info()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_results("quality_real", result, real_markdown(result), COMMAND + " real")


if __name__ == "__main__":
    main()
