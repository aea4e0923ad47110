"""Ablation of the composite loss (seed 002): CLIP only, CLIP+SupCon, CLIP+BCE, all three, and the SupCon
positive rules, over several seeds, on the demo corpus and on covid-cxr; plus the feature-cache speed-up.

Protocol (the paper's setting: frozen towers, a trained MLP projector):
- Both towers are frozen, their features computed once per dataset and split and shared by every arm and
  seed through one feature cache; each arm trains fresh projectors + abnormality head from its seed.
- demo: train on `train`, early-stop on `val` (image->report label mAP), evaluate on `test`.
- covid-cxr: the split is small (val 35, test 29 images), so arms train a fixed number of epochs on `train`
  without early stopping and are evaluated on val+test together (held out, patient-disjoint).
- Baselines in the same table: zero-shot (untrained projector, same seed) and random vectors.

Run:  .venv/bin/python -m benchmarks.retrieval_ablation [--seeds 3] [--demo-manifest M] [--covid-manifest M]
Writes benchmarks/results/retrieval_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import markdown_table, write_results

ALL = {"clip": 1.0, "supcon": 1.0, "bce": 1.0}
ARMS: dict[str, tuple[dict[str, float], str]] = {
    "clip": ({"clip": 1.0}, "overlap"),
    "clip+supcon": ({"clip": 1.0, "supcon": 1.0}, "overlap"),
    "clip+bce": ({"clip": 1.0, "bce": 1.0}, "overlap"),
    "clip+supcon+bce": (ALL, "overlap"),
    "clip+supcon+bce [same-set]": (ALL, "same-set"),
    "clip+supcon+bce [binary]": (ALL, "binary"),
}
# (direction, metric) pairs reported in the markdown table
REPORTED = [
    ("image->report", "R@1"),
    ("image->report", "R@10"),
    ("image->report", "MRR"),
    ("image->report", "LP@5"),
    ("image->report", "mAP_label"),
    ("report->image", "R@10"),
    ("report->image", "mAP_label"),
    ("image->image", "LP@5"),
    ("image->image", "mAP_label"),
]
SHORT = {"image->report": "i2r", "report->image": "r2i", "image->image": "i2i"}


def demo_manifest(work: Path, given: str | None) -> Path:
    """The demo corpus manifest: the given one, or built once into the work folder."""
    if given:
        return Path(given)
    from retrieval.data.demo import build_demo_corpus

    out = work / "demo"
    manifest = out / "manifest.parquet"
    if not manifest.is_file():
        build_demo_corpus(out)
    return manifest


def covid_manifest(work: Path, given: str | None) -> Path | None:
    """covid-cxr imported with the project's importer (None when ../shared/data is absent)."""
    if given:
        return Path(given)
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-cxr"
    if not src.is_dir():
        print(f"covid-cxr not found at {src}; skipping that dataset", file=sys.stderr)
        return None
    from retrieval.data.importers import import_source, relativize_paths
    from retrieval.data.manifest import write_manifest

    manifest = work / "covid" / "manifest.parquet"
    if not manifest.is_file():
        df = relativize_paths(import_source("covid-cxr", str(src)), manifest.parent)
        write_manifest(df, manifest)
    return manifest


def held_out_frame(manifest: Path, splits: tuple[str, ...]) -> Any:
    """The manifest with `splits` merged into one split named 'heldout'."""
    from retrieval.data.manifest import read_manifest

    df = read_manifest(manifest)
    df["split"] = ["heldout" if s in splits else s for s in df["split"]]
    return df


def run_dataset(name: str, df: Any, work: Path, args: argparse.Namespace, protocol: dict) -> dict[str, Any]:
    """Every arm x seed on one dataset; returns per-run metrics and baselines."""
    from retrieval.evaluate_retrieval import evaluate_embeddings, random_embeddings
    from retrieval.training import TrainConfig, Trainer

    cache = work / f"cache-{name}"
    runs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for arm, (weights, rule) in ARMS.items():
            config = TrainConfig(
                epochs=protocol["epochs"],
                batch_size=args.batch_size,
                lr=args.lr,
                loss_weights=weights,
                positive_rule=rule,
                seed=seed,
                patience=protocol["patience"],
                val_split=protocol["val_split"],
                max_train_studies=protocol.get("max_train_studies"),
                image_tower="frozen",
                cache_dir=str(cache),
                show_progress=False,
            )
            out = work / "runs" / name / f"{arm.replace(' ', '_')}-s{seed}"
            t0 = time.perf_counter()
            trainer = Trainer(df, args.model, out, config)
            trainer.run(fresh=True)
            items, img, rep = trainer.embed(protocol["eval_split"])
            metrics = evaluate_embeddings(items, img, rep)["metrics"]
            runs.append(
                {
                    "dataset": name,
                    "arm": arm,
                    "seed": seed,
                    "best_epoch": trainer.state["best_epoch"],
                    "epochs_run": trainer.state["epoch"],
                    "train_s": round(time.perf_counter() - t0, 2),
                    "metrics": metrics,
                }
            )
            print(
                f"[{name}] {arm:<28} seed {seed}: i2r mAP_label {metrics['image->report']['mAP_label']:.4f} "
                f"R@10 {metrics['image->report']['R@10']:.4f} ({runs[-1]['train_s']:.1f}s)",
                file=sys.stderr,
            )
            if arm == "clip":  # baselines once per seed, from the same cached features
                zs = Trainer(df, args.model, work / "runs" / name / f"zero-shot-s{seed}", config)
                zs.setup()
                zitems, zimg, zrep = zs.embed(protocol["eval_split"])
                baselines.append(
                    {
                        "system": "zero-shot",
                        "seed": seed,
                        "metrics": evaluate_embeddings(zitems, zimg, zrep)["metrics"],
                    }
                )
                rimg, rrep = random_embeddings(len(items.image_ids), len(items.reports), img.shape[1], seed)
                baselines.append(
                    {
                        "system": "random",
                        "seed": seed,
                        "metrics": evaluate_embeddings(items, rimg, rrep)["metrics"],
                    }
                )
    return {
        "runs": runs,
        "baselines": baselines,
        "eval_items": {"images": len(items.image_ids), "studies": len(items.study_ids)},
    }


def cache_speedup(manifest: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Epoch time of projector training with the frozen-feature cache vs re-running the towers each epoch."""
    from retrieval.training import TrainConfig, Trainer

    out: dict[str, Any] = {"train_studies": args.speed_studies}
    for label, use_cache in (("cached", True), ("uncached", False)):
        config = TrainConfig(
            epochs=1,
            batch_size=args.batch_size,
            lr=args.lr,
            val_split=None,
            image_tower="frozen",
            feature_cache=use_cache,
            cache_dir=str(work / "cache-demo"),  # shared with the demo arms (built once)
            max_train_studies=args.speed_studies,
            show_progress=False,
        )
        trainer = Trainer(manifest, args.model, work / "runs" / f"speed-{label}", config)
        t0 = time.perf_counter()
        trainer.run(fresh=True)
        epochs = [h["train_s"] for h in trainer.state["history"]]
        out[label] = {
            "epoch_s": epochs,
            "prepare_s": trainer.timings.get("prepare_train_s"),
            "total_s": round(time.perf_counter() - t0, 2),
        }
    out["speedup_per_epoch"] = round(float(np.mean(out["uncached"]["epoch_s"]) / np.mean(out["cached"]["epoch_s"])), 1)
    return out


def summarise(result: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Mean ± std over seeds per (dataset, system) and the winning positive rule per dataset."""
    rows = []
    for dataset, res in result["datasets"].items():
        systems: dict[str, list[dict]] = {}
        for b in res["baselines"]:
            systems.setdefault(f"baseline: {b['system']}", []).append(b["metrics"])
        for r in res["runs"]:
            systems.setdefault(r["arm"], []).append(r["metrics"])
        for system, ms in systems.items():
            row: dict[str, Any] = {"dataset": dataset, "system": system, "seeds": len(ms)}
            for direction, metric in REPORTED:
                vals = np.array([m[direction][metric] for m in ms], dtype=float)
                row[f"{SHORT[direction]} {metric}"] = f"{vals.mean():.3f} ± {vals.std():.3f}"
            rows.append(row)
    best_rule = {}
    for dataset, res in result["datasets"].items():
        scores = {}
        for r in res["runs"]:
            if r["arm"].startswith("clip+supcon+bce"):
                rule = r["arm"].split("[")[-1].rstrip("]") if "[" in r["arm"] else "overlap"
                scores.setdefault(rule, []).append(r["metrics"]["image->report"]["mAP_label"])
        best_rule[dataset] = max(scores, key=lambda k: np.mean(scores[k])) if scores else ""
    return rows, best_rule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="cxr-tiny")
    parser.add_argument("--epochs", type=int, default=6, help="demo: maximum epochs (early stopping on val)")
    parser.add_argument("--demo-train-studies", type=int, default=1000, help="demo: first N train studies")
    parser.add_argument("--covid-epochs", type=int, default=10, help="covid-cxr: fixed epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--speed-studies", type=int, default=192)
    parser.add_argument("--demo-manifest")
    parser.add_argument("--covid-manifest")
    parser.add_argument("--work", default="/tmp/cxr-retrieval-ablation", help="models and caches (not the repo)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    result: dict[str, Any] = {"arms": {k: {"loss_weights": w, "positive_rule": r} for k, (w, r) in ARMS.items()}}
    result["settings"] = vars(args)
    demo = demo_manifest(work, args.demo_manifest)
    result["feature_cache"] = cache_speedup(demo, work, args)
    print(f"feature cache: {result['feature_cache']}", file=sys.stderr)
    datasets = {
        "demo": (
            demo,
            {
                "epochs": args.epochs,
                "patience": 3,
                "val_split": "val",
                "eval_split": "test",
                "max_train_studies": args.demo_train_studies,
            },
        )
    }
    covid = covid_manifest(work, args.covid_manifest)
    if covid is not None:
        datasets["covid-cxr"] = (
            covid,
            {"epochs": args.covid_epochs, "patience": 10**6, "val_split": None, "eval_split": "heldout"},
        )
    result["datasets"] = {}
    for name, (manifest, protocol) in datasets.items():
        df = held_out_frame(manifest, ("val", "test")) if protocol["eval_split"] == "heldout" else None
        if df is None:
            from retrieval.data.manifest import read_manifest

            df = read_manifest(manifest)
        result["datasets"][name] = {
            "manifest": str(manifest),
            "protocol": protocol,
            **run_dataset(name, df, work, args, protocol),
        }
    rows, best_rule = summarise(result)
    result["summary"] = rows
    result["best_positive_rule"] = best_rule
    result["total_s"] = round(time.perf_counter() - t0, 1)

    fc = result["feature_cache"]
    md = [
        "Composite-loss ablation (seed 002): frozen towers, trained projector; mean ± std over "
        f"{args.seeds} seeds. Metrics as defined in `retrieval/evaluate_retrieval.py` (i2r = image->report, r2i = "
        "report->image, i2i = image->image with the query's patient excluded; LP@5 = label precision@5, "
        "mAP_label = mAP with overlapping label sets as relevant).",
        "",
        markdown_table(rows),
        f"Best SupCon positive rule by image->report mAP_label: {best_rule}.",
        "",
        f"Feature cache ({fc['train_studies']} train studies, frozen towers): epoch "
        f"{np.mean(fc['uncached']['epoch_s']):.2f}s uncached vs "
        f"{np.mean(fc['cached']['epoch_s']):.3f}s cached "
        f"= {fc['speedup_per_epoch']}x per epoch (one-time cache build {fc['cached']['prepare_s']}s).",
        "",
        f"Total benchmark time {result['total_s']:.0f}s.",
    ]
    command = "python -m benchmarks.retrieval_ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = write_results("retrieval_ablation", result, "\n".join(md) + "\n", command.strip())
    print("\n".join(md))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
