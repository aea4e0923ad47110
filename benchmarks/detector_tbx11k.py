"""Detector benchmark on TBX11K `[identify]`: the trainable FCOS detector (generation/heads/detector.py) against
the ridge box head on frozen cxr-small tokens, the image-free training prior and answers shuffled between test
images, all on the importer's patient-disjoint test split, with 95% bootstrap intervals.

    cxr data import yolo ../shared/data/tbx11k-tb --out /tmp/det/tbx.parquet
    nice python -m benchmarks.detector_tbx11k --manifest /tmp/det/tbx.parquet --work /tmp/det/work \
        --arm frozen224:size=224 --arm ft224:size=224,trainable_stages=2,max_minutes=15

An arm is `NAME[:key=value,...]` overriding `DetectorTrainConfig` fields; its detector lands in `--work/NAME` (a
folder that already holds one is evaluated, not retrained) and its figures in `--work/NAME/eval.json`. The
baselines (ridge head, prior) are computed once into `--work/baselines.json`. Every invocation rewrites
benchmarks/results/detector_tbx11k.{json,md} from every arm evaluated in `--work`, so arms may run as separate
processes. Metrics: Acc@0.3 of the answer a reader sees, mAP@0.5 (COCO, every scored detection ranked),
mAP@0.5 of the answer alone, boxes per answer.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waiting on busy machines

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, machine_info  # noqa: E402
from benchmarks.generation_runs import _parse_arm  # noqa: E402
from generation.evaluation.prior_answers import prior_groups  # noqa: E402

N_BOOT = 300
MARK = "<!-- tables below are written by benchmarks/detector_tbx11k.py -->"


def metrics(truth: list, answers: list, detections: list) -> dict:
    from generation.evaluation.metrics import localisation_accuracy, map50

    return {
        "acc@0.3": localisation_accuracy(truth, answers)["acc@0.3"],
        "map@0.5": map50(truth, detections),
        "map@0.5_answer": map50(truth, answers),
        "boxes/answer": float(np.mean([len(a) for a in answers])),
    }


def bootstrap(truth: list, answers: list, detections: list, n: int = N_BOOT, seed: int = 0) -> dict:
    """95% percentile intervals of Acc@0.3 and mAP@0.5 over test images resampled with replacement."""
    from generation.evaluation.metrics import localisation_accuracy, map50

    rng = np.random.default_rng(seed)
    draws = {"acc@0.3": [], "map@0.5": []}
    for _ in range(n):
        idx = rng.integers(0, len(truth), len(truth))
        t = [truth[i] for i in idx]
        draws["acc@0.3"].append(localisation_accuracy(t, [answers[i] for i in idx])["acc@0.3"])
        draws["map@0.5"].append(map50(t, [detections[i] for i in idx]))
    return {f"{k} 95%": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}


def condition(truth: list, answers: list, detections: list, n_boot: int) -> dict:
    return metrics(truth, answers, detections) | bootstrap(truth, answers, detections, n_boot)


def shuffled(items: list, seed: int = 0) -> list:
    """Answers moved between test images (a derangement-free random permutation is fine at n = 60)."""
    perm = np.random.default_rng(seed).permutation(len(items))
    return [items[p] for p in perm]


def ridge_head(df, work: Path, test_rows: list[int]) -> tuple[list, list, float]:
    """The fast baseline: `box_head.fit_box_head` on the frozen cxr-small tower's 7x7 tokens of the train rows,
    as `cxr vlm train` fits it; returns (answers, detections, seconds) on `test_rows`."""
    from generation.data.features import visual_tokens_for_rows
    from generation.heads.box_head import fit_box_head, pooled_features
    from generation.model.encoders import load_encoder

    t0 = time.time()
    train_rows = [int(i) for i in np.flatnonzero((df["split"] == "train").to_numpy()) if len(df.iloc[i]["boxes"])]
    enc = load_encoder("cxr:cxr-small")
    vis, bad = visual_tokens_for_rows(df, train_rows + test_rows, [enc], 7, progress=False, cache_dir=work / "tokens")
    if bad:
        raise RuntimeError(f"unreadable images: {bad[:2]}")
    head = fit_box_head(pooled_features(vis, train_rows), [list(df.iloc[r]["boxes"]) for r in train_rows], set())
    feats = pooled_features(vis, test_rows)
    return head.identify(feats), head.detections(feats), time.time() - t0


def baselines(df, work: Path, test_rows: list[int], truth: list, n_boot: int) -> dict:
    path = work / "baselines.json"
    if path.exists():
        return json.loads(path.read_text())
    train_boxes = [list(b) for b in df.loc[df["split"] == "train", "boxes"]]
    prior = prior_groups(train_boxes)
    ans, dets, secs = ridge_head(df, work, test_rows)
    out = {
        "prior (every label x half, by prevalence)": condition(
            truth, [prior] * len(truth), [prior] * len(truth), n_boot
        ),
        "prior, two most prevalent groups": condition(
            truth, [prior[:2]] * len(truth), [prior[:2]] * len(truth), n_boot
        ),
        "ridge box head (frozen cxr-small 7x7 tokens)": condition(truth, ans, dets, n_boot) | {"fit+encode s": secs},
        "ridge box head, shuffled": condition(truth, shuffled(ans), shuffled(dets), n_boot),
        "prior_groups": prior,
    }
    path.write_text(json.dumps(out, indent=1))
    return out


def run_arm(df, work: Path, arm: str, over: dict, test_rows: list[int], truth: list, n_boot: int) -> dict:
    from generation.heads.detector import Detector
    from generation.training.detector_train import DetectorTrainConfig, train_detector
    from retrieval.data.image_io import read_image

    out = work / arm
    if (out / "detector_train.json").exists():
        info = json.loads((out / "detector_train.json").read_text())
    else:
        info = train_detector(df, out, DetectorTrainConfig(**over))
    det = Detector.load(out)
    images = [read_image(df.iloc[r]["image_path"]) for r in test_rows]
    det.predict(images[:2])  # warm-up
    t0 = time.perf_counter()
    dets = det.predict(images, batch_size=1)
    ms = 1000 * (time.perf_counter() - t0) / len(images)
    answers = [det.answer(d) for d in dets]
    info.pop("history", None)
    res = {
        "arm": arm,
        "overrides": over,
        "train": info,
        "ms_per_image_cpu": ms,
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "detector": condition(truth, answers, dets, n_boot),
        "detector, shuffled": condition(truth, shuffled(answers), shuffled(dets), n_boot),
    }
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def summarise(base: dict, arms: list[dict]) -> str:
    cols = ["acc@0.3", "acc@0.3 95%", "map@0.5", "map@0.5 95%", "map@0.5_answer", "boxes/answer"]

    def fmt(v) -> str:
        return f"{v[0]:.3f}-{v[1]:.3f}" if isinstance(v, list) else f"{v:.3f}"

    rows = [(k, v) for k, v in base.items() if k != "prior_groups"]
    rows += [(f"{a['arm']}: {k}", a[k]) for a in arms for k in ("detector", "detector, shuffled")]
    lines = ["| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(m[c]) for c in cols) + " |" for name, m in rows]
    lines += ["", "| arm | overrides | epochs | best val mAP@0.5 | train s (stage cache s) | CPU ms / image | load |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for a in arms:
        t = a["train"]
        lines.append(
            f"| {a['arm']} | `{json.dumps(a['overrides'])}` | {t['epochs_run']} | {t['best_val_map50']:.3f} | "
            f"{t['seconds']:.0f} ({t['seconds_cache']:.0f}) | {a['ms_per_image_cpu']:.0f} | {a['load_avg_1min']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    from retrieval.data.manifest import read_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--work", default="/tmp/det/work")
    ap.add_argument("--arm", action="append", default=[])
    ap.add_argument("--boot", type=int, default=N_BOOT)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    df = read_manifest(args.manifest)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test_rows = [int(i) for i in np.flatnonzero((df["split"] == "test").to_numpy())]
    truth = [list(df.iloc[r]["boxes"]) for r in test_rows]
    base = baselines(df, work, test_rows, truth, args.boot)
    for text in args.arm:
        arm, over = _parse_arm(text)
        res = run_arm(df, work, arm, over, test_rows, truth, args.boot)
        print(arm, json.dumps(res["detector"]), flush=True)
    arms = [json.loads(p.read_text()) for p in sorted(work.glob("*/eval.json"))]
    (RESULTS / "detector_tbx11k.json").write_text(
        json.dumps({"machine": machine_info(), "args": vars(args), "baselines": base, "arms": arms}, indent=1)
    )
    md = RESULTS / "detector_tbx11k.md"
    prose = md.read_text().split(MARK)[0] if md.exists() and MARK in md.read_text() else ""
    md.write_text(prose + MARK + "\n\n" + summarise(base, arms))
    print(summarise(base, arms))


if __name__ == "__main__":
    main()
