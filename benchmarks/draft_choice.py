"""Which of N report drafts to keep: the choice rules of generation/writing/draft_choice.py, scored on the same drafts.

    python -m benchmarks.draft_choice --demo DEMO_WORKDIR --vlm LORA_VLM --split val --n 120 --drafts 7

Draws the product path's drafts once (the `Generator` with `report_decoding(1, N)`, k = 0, the demo's seeded sample
of `n` examples; each row's drafts recorded as `pick_draft` receives them, kept in LORA_VLM/bench_evals/ and reused)
and scores each rule on them, beside retrieval-only:
- `greedy`: the contrastive greedy draft alone;
- `agreement, then first`: the best agreement with the finding head, ties to the earlier draft (the rule until
  2026-12-07);
- `agreement, then consensus`: ties to the draft closest to the other drafts (`pick_draft` now);
- `agreement, then longest`: ties to the longest draft (BLEU's brevity penalty, as an ablation).
Each row gives the length ratio to the references (BLEU-4 is cut by exp(1 - 1/ratio) below 1) and the share of its
sentences found word for word in one of the top-3 retrieved training reports. For the product's rule, the gap to
retrieval-only in BLEU-4 and ROUGE-L comes with its 95% paired bootstrap interval over the examples (both systems on
the same resampled examples; retrieval/bootstrap.py), to tell a gap from the noise of n examples. Results:
benchmarks/results/draft_choice_VLM_SPLIT.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waiting on busy machines

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from benchmarks.common import RESULTS, machine_info  # noqa: E402


def _draw(vlm: Path, demo: Path, split: str, n: int, drafts: int, min_new: int = 0) -> list[dict]:
    """Per example: its reference, the head's findings, every draft, and the top-5 retrieved training reports.
    `min_new` > 0 keeps the LM from ending a draft before that many tokens (transformers' `min_new_tokens`)."""
    cached = vlm / "bench_evals" / f"drafts-{split}-{n}-{drafts}{f'-min{min_new}' if min_new else ''}.json"
    if cached.exists():
        return json.loads(cached.read_text())["rows"]
    import generation.writing.generate as generate
    from generation.evaluation.eval_inputs import eval_inputs
    from generation.evaluation.evaluate_generation import _vlm_outputs
    from generation.writing.generator_options import GeneratorOptions
    from retrieval.data.manifest import read_manifest

    seen: list[dict] = []
    choose = generate.pick_draft

    def record(texts: list[str], findings: list[str]) -> tuple[int, float]:
        seen.append({"drafts": list(texts), "findings": list(findings)})
        return choose(texts, findings)

    t0 = time.time()
    generate.pick_draft = record
    try:
        decoding = generate.report_decoding(1.0, drafts)
        decoding["report"] |= {"min_new_tokens": min_new} if min_new else {}
        gen = generate.Generator(
            vlm, demo / "index", decoding=decoding, options=GeneratorOptions(report_source="generate")
        )
        df = read_manifest(demo / "corpus" / "manifest.parquet")
        data = eval_inputs(gen, df, ["report"], split, [5], n, 0, False, None, "reports", demo / "visual_tokens")
        exs = data.examples["report"]
        outs = _vlm_outputs(gen, data, "report", exs, 0)
    finally:
        generate.pick_draft = choose
    gen.options = dataclasses.replace(gen.options, report_source="findings")  # the template writer, same examples
    templates = [o["text"] for o in _vlm_outputs(gen, data, "report", exs, 0)]
    if drafts == 1:  # no choice to make: the greedy draft is the answer
        seen = [{"drafts": [o["text"]], "findings": list(o.get("head_findings", []))} for o in outs]
    if len(seen) != len(exs):
        raise RuntimeError(f"{len(seen)} draft sets for {len(exs)} examples")
    rows = [
        {
            "row": int(e.row),
            "target": e.target,
            **s,
            "template": t,
            "neighbours": [{"study_id": str(x.study_id), "report": x.report} for x in data.exemplars.get(e.row, [])],
        }
        for e, s, t in zip(exs, seen, templates, strict=True)
    ]
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps({"seconds": round(time.time() - t0, 1), "rows": rows}))
    return rows


def _score(rows: list[dict], answers: list[str]) -> dict:
    from generation.evaluation.metrics import _norm
    from generation.evaluation.task_scores import score_task
    from retrieval.study_text import normalized_sentences as sentences

    s = score_task("report", [SimpleNamespace(target=r["target"]) for r in rows], answers, meteor=False)
    out = {k: round(s[k], 3) for k in ("ce_macro_f1", "ce_micro_f1", "bleu4", "rougeL", "repeat_sentence")}
    words = sum(len(_norm(a).split()) for a in answers) / sum(len(_norm(r["target"]).split()) for r in rows)
    said = [(s, r) for a, r in zip(answers, rows, strict=True) for s in sentences(a)]
    top3 = [{t for x in r["neighbours"][:3] for t in sentences(x["report"])} for _, r in said]
    copied = sum(s in t for (s, _), t in zip(said, top3, strict=True)) / max(1, len(said))
    return {**out, "length_ratio": round(words, 2), "copied_from_top3": round(copied, 3)}


def gaps(rows: list[dict], answers: list[str]) -> dict:
    """`answers` minus retrieval-only, BLEU-4 (corpus) and ROUGE-L (mean F), and minus the template writer, CE
    macro-F1 (where the rows hold its report), each with its paired 95% interval."""
    import numpy as np

    from generation.evaluation.metrics import corpus_bleu, multilabel_prf, rouge_l
    from retrieval.bootstrap import interval, resampled
    from retrieval.labels import label_report

    refs, top1 = [r["target"] for r in rows], [r["neighbours"][0]["report"] for r in rows]

    def bleu4(hyps: list[str], idx: np.ndarray) -> float:
        return corpus_bleu([refs[i] for i in idx], [hyps[i] for i in idx])[3]

    diff = np.subtract(rouge_l(refs, answers), rouge_l(refs, top1))
    out = {
        "bleu4_minus_retrieval": resampled(len(rows), lambda i: bleu4(answers, i) - bleu4(top1, i)).record(),
        "rougeL_minus_retrieval": interval(diff).record(),
    }
    if all("template" in r for r in rows):  # labelled once here, not per resample as `clinical_efficacy` would
        truth, mine, theirs = (
            [label_report(t) for t in texts] for texts in (refs, answers, [r["template"] for r in rows])
        )

        def ce(pred: list, idx: np.ndarray) -> float:
            return multilabel_prf([truth[i] for i in idx], [pred[i] for i in idx])["macro_f1"]

        out["ce_macro_minus_template"] = resampled(len(rows), lambda i: ce(mine, i) - ce(theirs, i)).record()
    return out


def rules(rows: list[dict]) -> dict[str, dict]:
    """{rule: metrics} over the same drafts (see the module docstring)."""
    from generation.writing.draft_choice import agreement, pick_draft

    def keep(tie_break) -> list[str]:  # best agreement, equals ordered by tie_break(draft), then the first
        out = []
        for r in rows:
            d = r["drafts"]
            ag = [agreement(t, r["findings"]) for t in d]
            out.append(d[max(range(len(d)), key=lambda i: (ag[i], tie_break(d[i]), -i))])
        return out

    product = [r["drafts"][pick_draft(r["drafts"], r["findings"])[0]] for r in rows]
    return {
        "greedy": _score(rows, [r["drafts"][0] for r in rows]),
        "agreement, then first": _score(rows, keep(lambda t: 0)),
        "agreement, then consensus (pick_draft)": {**_score(rows, product), **gaps(rows, product)},
        "agreement, then longest": _score(rows, keep(lambda t: len(t.split()))),
        "retrieval-only": _score(rows, [r["neighbours"][0]["report"] for r in rows]),
    } | ({"template writer (the default)": _score(rows, [r["template"] for r in rows])}
         if all("template" in r for r in rows) else {})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--vlm", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--drafts", type=int, default=7)
    ap.add_argument("--min-new-tokens", type=int, default=0, help="a floor on each draft's length (an ablation)")
    a = ap.parse_args()
    rows = _draw(a.vlm, a.demo, a.split, a.n, a.drafts, a.min_new_tokens)
    table = rules(rows)
    cols = ("ce_macro_f1", "ce_micro_f1", "bleu4", "rougeL", "length_ratio", "copied_from_top3")
    print(f"| rule ({a.split}, n = {len(rows)}, {a.drafts} drafts) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, m in table.items():
        print(f"| {name} | " + " | ".join(str(m[c]) for c in cols) + " |")
    product = table["agreement, then consensus (pick_draft)"]
    for gap in ("bleu4_minus_retrieval", "rougeL_minus_retrieval", "ce_macro_minus_template"):
        if gap not in product:
            continue
        e = product[gap]
        print(
            f"pick_draft {gap}: {e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}] (95% paired bootstrap, n = {e['n']})"
        )
    variant = "".join(f"_{tag}{v}" for tag, v, default in (("n", a.n, 120), ("drafts", a.drafts, 7),
                                                           ("min", a.min_new_tokens, 0)) if v != default)  # fmt: skip
    out = {"vlm": str(a.vlm), "split": a.split, "n": len(rows), "drafts": a.drafts, "min_new_tokens": a.min_new_tokens}
    path = RESULTS / f"draft_choice_{a.vlm.name}_{a.split}{variant}.json"
    path.write_text(json.dumps({**out, "rules": table, "machine": machine_info()}, indent=1))


if __name__ == "__main__":
    main()
