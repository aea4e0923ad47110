"""Generation metrics, each from the library that defines it.

- Text: BLEU-1..4, METEOR, CIDEr (pycocoevalcap; METEOR runs Java and is skipped with a warning without it),
  ROUGE-L F (rouge-score), corpus BLEU (sacrebleu).
- Clinical efficacy: the labeler (`label_report`) on generated vs reference text, P/R/F1 micro and macro
  (scikit-learn over multi-label indicator matrices).
- VQA accuracy (normalised exact match), classification P/R/F1 (label lists).
- Localisation: Accuracy@IoU 0.3/0.4/0.5 (a ground-truth box counts as found when a predicted box of the same
  label overlaps it with IoU above the threshold, LiteGPT's measure) and mAP@0.5 (pycocotools COCOeval; a
  generated box's score is its rank in the answer, first = most confident).
- Grounding: mean IoU of each ground-truth box with its best predicted box (0 when nothing was predicted).
- Report metrics of the field, optional: CheXbert-label F1 and RadGraph F1 live in `report_metrics.py`; inside its
  `use_report_metrics` block `text_metrics` adds them.

Which BLEU: `bleu1`..`bleu4` are pycocoevalcap's corpus BLEU-n on lower-cased, punctuation-split text (the
captioning papers' BLEU); ReXrank's leaderboard column "BLEU" is BLEU-2, i.e. `bleu2` here. `sacrebleu` is
sacreBLEU's corpus BLEU-4 (0-100, its own tokenizer).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings
from collections.abc import Sequence

import numpy as np
from torchvision.ops import box_iou

from generation.data.boxes import boxes_tensor
from generation.evaluation.report_metrics import active_scores
from retrieval.labels import LABELS, multi_hot

IOU_THRESHOLDS = (0.3, 0.4, 0.5)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", str(text).lower()))


def _coco(texts: Sequence[str]) -> dict[int, list[str]]:
    """pycocoevalcap's input: normalised text per item ("." for an empty one)."""
    return {i: [_norm(t) or "."] for i, t in enumerate(texts)}


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    """pycocoevalcap's corpus BLEU-1..4 of `hypotheses` against one reference each (the `bleu1`..`bleu4` here)."""
    from pycocoevalcap.bleu.bleu import Bleu

    bleu, _ = Bleu(4).compute_score(_coco(references), _coco(hypotheses), verbose=0)
    return [float(b) for b in bleu]


def rouge_l(references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each hypothesis against its reference (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses, strict=True)]


def text_metrics(references: Sequence[str], hypotheses: Sequence[str], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, CIDEr (pycocoevalcap), ROUGE-L F1 (rouge-score) and sacreBLEU over the corpus."""
    from pycocoevalcap.cider.cider import Cider
    from sacrebleu.metrics import BLEU

    if len(references) != len(hypotheses) or not references:
        raise ValueError("need as many hypotheses as references, and at least one")
    refs, hyps = _coco(references), _coco(hypotheses)
    out = {f"bleu{i + 1}": b for i, b in enumerate(corpus_bleu(references, hypotheses))}
    out["meteor"] = None
    if meteor:
        if shutil.which("java") is None:
            warnings.warn("java not found: METEOR skipped", stacklevel=2)
        else:
            from pycocoevalcap.meteor.meteor import Meteor

            m = Meteor()
            try:
                out["meteor"] = float(m.compute_score(refs, hyps)[0])
            finally:
                with contextlib.suppress(Exception):
                    m.close()
    out["cider"] = float(Cider().compute_score(refs, hyps)[0])
    out["rougeL"] = float(np.mean(rouge_l(references, hypotheses)))
    out["sacrebleu"] = float(BLEU().corpus_score(list(hypotheses), [list(references)]).score)
    out |= active_scores(references, hypotheses)  # CheXbert / RadGraph inside `use_report_metrics` (report_metrics.py)
    return out


# ---- which BLEU ------------------------------------------------------------------------------------------
BLEU_NOTE = (
    "bleu1..bleu4: pycocoevalcap corpus BLEU-n; ReXrank's 'BLEU' is BLEU-2 (= bleu2); sacrebleu: sacreBLEU BLEU-4"
)


def multilabel_prf(
    true: Sequence[Sequence[str]],
    pred: Sequence[Sequence[str]],
    labels: Sequence[str] = LABELS,
    per_label: bool = False,
) -> dict:
    """Micro and macro precision/recall/F1 over `labels` (scikit-learn; macro: over the labels in truth or
    prediction, so a label nobody names neither counts as 0 nor hides a false positive). With `per_label`, also
    `per_label[label]` = precision, recall, f1, support (true count) and predicted (count). The project's one P/R/F1
    of label lists: the report labeler's benchmark uses it too."""
    from sklearn.metrics import precision_recall_fscore_support

    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true label lists but {len(pred)} predicted ones")
    y_true, y_pred = multi_hot(true, labels).astype(int), multi_hot(pred, labels).astype(int)
    out: dict = {}
    for avg in ("micro", "macro"):
        cols = np.flatnonzero(y_true.any(0) | y_pred.any(0)) if avg == "macro" else np.arange(len(labels))
        if len(cols) == 0:
            p = r = f = 0.0
        else:
            p, r, f, _ = precision_recall_fscore_support(y_true[:, cols], y_pred[:, cols], average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    if per_label:
        p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
        out["per_label"] = {
            lab: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j])}
            | {"support": int(support[j]), "predicted": int(y_pred[:, j].sum())}
            for j, lab in enumerate(labels)
        }
    return out


def clinical_efficacy(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """P/R/F1 of the labeler's labels on the generated text against those on the reference text."""
    from retrieval.labels import label_report

    return multilabel_prf([label_report(r) for r in references], [label_report(h) for h in hypotheses])


def parse_label_list(text: str, labels: Sequence[str] = LABELS) -> list[str]:
    """Labels named in a generated diagnosis list (case-insensitive, comma-separated)."""
    canon = {lab.lower(): lab for lab in labels}
    parts = [re.sub(r"\s+", " ", p).strip(" .") for p in str(text).lower().split(",")]
    return [canon[p] for p in parts if p in canon]


def vqa_accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Exact-match accuracy after lower-casing and collapsing whitespace/punctuation spacing."""
    if not references:
        return float("nan")
    return float(np.mean([_norm(r) == _norm(h) for r, h in zip(references, hypotheses, strict=True)]))


def _iou_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.nan_to_num(box_iou(boxes_tensor(a), boxes_tensor(b)).numpy(), nan=0.0)


def localisation_accuracy(
    truth: Sequence[Sequence[dict]],
    preds: Sequence[Sequence[dict]],
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> dict:
    """Accuracy@IoU: share of ground-truth boxes with a same-label predicted box of IoU > threshold."""
    hits = {t: 0 for t in thresholds}
    n = 0
    for gt, pr in zip(truth, preds, strict=True):
        for g in gt:
            n += 1
            same = [p for p in pr if str(p.get("label", "")).lower() == str(g["label"]).lower()]
            best = float(_iou_matrix([g], same).max()) if same else 0.0
            for t in thresholds:
                hits[t] += best > t
    return {f"acc@{t}": (hits[t] / n if n else float("nan")) for t in thresholds} | {"gt_boxes": n}


def map50(truth: Sequence[Sequence[dict]], preds: Sequence[Sequence[dict]]) -> float:
    """COCO-style AP at IoU 0.5 (pycocotools), averaged over labels. A predicted box's score is its `score`
    when it has one (the box head's confidence), else its rank within the answer (1 / (1 + rank))."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = sorted({str(b["label"]).lower() for bs in truth for b in bs})
    if not names:
        return float("nan")
    cat = {n: i + 1 for i, n in enumerate(names)}

    def xywh(b: dict) -> list[float]:
        return [100 * b["x1"], 100 * b["y1"], 100 * (b["x2"] - b["x1"]), 100 * (b["y2"] - b["y1"])]

    anns = []
    for img, bs in enumerate(truth):
        for b in bs:
            box = xywh(b)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img,
                    "category_id": cat[str(b["label"]).lower()],
                    "bbox": box,
                    "area": max(box[2] * box[3], 1e-6),
                    "iscrowd": 0,
                }
            )
    dets = []
    for img, bs in enumerate(preds):
        for rank, b in enumerate(bs):
            name = str(b.get("label", "")).lower()
            if name in cat:
                dets.append(
                    {
                        "image_id": img,
                        "category_id": cat[name],
                        "bbox": xywh(b),
                        "score": float(b.get("score", 1.0 / (1 + rank))),
                    }
                )
    if not dets:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i} for i in range(len(truth))],
            "annotations": anns,
            "categories": [{"id": v, "name": k} for k, v in cat.items()],
        }
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [100]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, 0]  # (recall thresholds, categories)
    valid = [c for c in range(prec.shape[1]) if (prec[:, c] > -1).any()]
    if not valid:
        return 0.0
    return float(np.mean([np.clip(prec[:, c], 0, None).mean() for c in valid]))


def grounding_iou(truth: Sequence[Sequence[dict]], preds: Sequence[Sequence[dict]]) -> dict:
    """Mean over ground-truth boxes of the best IoU with any predicted box of the answer; and Acc@0.5."""
    ious = []
    for gt, pr in zip(truth, preds, strict=True):
        m = _iou_matrix(gt, pr)
        ious += list(m.max(1)) if m.size else [0.0] * len(gt)
    if not ious:
        return {"mean_iou": float("nan"), "acc@0.5": float("nan"), "gt_boxes": 0}
    arr = np.asarray(ious)
    return {"mean_iou": float(arr.mean()), "acc@0.5": float((arr > 0.5).mean()), "gt_boxes": len(arr)}


def repeats_a_sentence(text: str) -> bool:
    """True when some sentence occurs twice in `text` (lower-cased, whitespace and final period normalised)."""
    from retrieval.study_text import normalized_sentences

    s = normalized_sentences(text)
    return len(s) != len(set(s))


def repeated_sentence_fraction(texts: Sequence[str]) -> float:
    """Share of outputs that repeat one of their own sentences (a looping decoder's signature)."""
    if not texts:
        return float("nan")
    return float(np.mean([repeats_a_sentence(t) for t in texts]))
