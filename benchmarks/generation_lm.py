"""The LM-written report on the demo corpus: SmolLM2 (zero-shot and + LoRA) against the template writer, the tiny LM
and the baselines, in one run; the image controls (blank / noise / another study's image); cost.

    python -m benchmarks.generation_lm --demo DEMO_WORKDIR --work W --n 40 --lora-steps 40

DEMO_WORKDIR is a finished `cxr demo` folder (corpus, index, visual-token cache). VLM folders land under --work
(reused when there). Rows, all on the same `n` test examples per task (report, closed/open VQA):
constant, retrieval-only, the template writer (`report_source=findings`), the tiny LM trained from scratch,
SmolLM2 zero-shot (findings + exemplars in the prompt), SmolLM2 + LoRA, each at k=0 and k=3, the last VLM
condition's answers shuffled between test images, and SmolLM2 zero-shot on blank / noise / another study's image.
Results: benchmarks/results/generation_lm_demo.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waiting on busy machines

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import RESULTS, machine_info  # noqa: E402

TINY_SIZE = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256}  # the previous demo's tiny LM
COLUMNS = ("ce_macro_f1", "ce_micro_f1", "bleu4", "rougeL", "repeat_sentence")


def _train(name: str, work: Path, demo: Path, **over) -> Path:
    from generation.training.train import VLMTrainConfig, train_vlm

    out = work / name
    if (out / "train_info.json").exists():
        return out
    cfg = VLMTrainConfig(**{"seed": 0, "token_cache": str(demo / "visual_tokens"), **over})  # --lora-over may set seed
    t0 = time.time()
    info = train_vlm(demo / "corpus" / "manifest.parquet", out, cfg, index_dir=demo / "index", progress=False)
    print(f"trained {name}: {time.time() - t0:.0f} s, loss {info['loss_first20']} -> {info['loss_last20']}")
    return out


def _key(n: int, tasks: list[str], kw: dict) -> str:
    """The cache file name of one evaluation (options left at their default do not count)."""
    kw = {a: v for a, v in kw.items() if v is not False}
    return "-".join([str(n), *tasks, *(f"{a}={kw[a]}" for a in sorted(kw))]) + ".json"


def _evaluate(vlm: Path, demo: Path, n: int, tasks: list[str], kw: dict | None = None, **more) -> dict:
    """evaluate_generation's result, kept under the VLM folder per (n, tasks, options): a run interrupted on a
    shared machine, or run in parts, reuses what it finished. Options come as `kw` or as keywords."""
    from generation.evaluation.evaluate_generation import evaluate_generation
    from generation.writing.generator_options import GeneratorOptions

    kw = {**(kw or {}), **more}
    cached = vlm / "bench_evals" / _key(n, tasks, kw)
    if cached.exists():
        return json.loads(cached.read_text())
    t0 = time.time()
    options = GeneratorOptions.pop_from(kw)  # report_source=..., vqa_source=...
    k = kw.pop("k", 3)
    contrast, drafts = kw.pop("contrast", 0), kw.pop("drafts", 1)
    if contrast or drafts > 1:  # contrastive decoding (generation/model/contrast.py), the best of N drafts
        from generation.writing.generate import report_decoding

        kw["decoding"] = report_decoding(contrast, drafts)
    res = evaluate_generation(
        vlm,
        demo / "corpus" / "manifest.parquet",
        demo / "index",
        k=k,
        tasks=tasks,
        max_per_task=n,
        meteor=False,
        progress=False,
        token_cache=demo / "visual_tokens",
        options=options,
        **kw,
    )
    print(f"evaluated {vlm.name} {kw}: {time.time() - t0:.0f} s")
    res["evaluate_s"] = round(time.time() - t0, 1)
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps(res, default=str))
    return res


def _rows(res: dict, label: str, keep: tuple[str, ...]) -> list[dict]:
    """Table rows for the conditions in `keep` (`vlm k=0` -> `LABEL k=0`)."""
    out = []
    report, vqa = res["tasks"].get("report", {}), res["tasks"].get("vqa", {})
    for cond in keep:
        if cond not in report:
            continue
        name = cond.replace("vlm", label) if cond.startswith("vlm") else cond
        if cond == "shuffled":
            name = f"{label} shuffled between images"
        row = {"row": name, **{c: report[cond].get(c) for c in COLUMNS}}
        row["vqa_closed"] = vqa.get(cond, {}).get("accuracy_closed")
        row["vqa_open"] = vqa.get(cond, {}).get("accuracy_open")
        kk = cond.split("=")[1] if "=" in cond else None
        row["copied"] = res["rag"].get(f"k={kk}", {}).get("output_sentences_copied") if kk and kk != "0" else None
        out.append(row)
    return out


def _cost(vlm: Path, demo: Path) -> dict:
    """Generation tokens/s and `cxr generate` latency with the model loaded once (as `cxr serve` holds it)."""
    import pandas as pd

    from generation.writing.generate import Generator
    from generation.writing.generator_options import GeneratorOptions
    from generation.writing.image_answer import generate_for_image

    df = pd.read_parquet(demo / "corpus" / "manifest.parquet")
    t0 = time.time()
    gen = Generator(vlm, demo / "index", options=GeneratorOptions(report_source="generate"))
    load_s = time.time() - t0
    test = df[df["split"] == "test"].head(4)
    times, tokens = [], 0
    for path in test["image_path"]:
        t1 = time.time()
        rec = generate_for_image(demo / "corpus" / path, demo / "index", vlm, k=3, generator=gen)
        times.append(time.time() - t1)
        tokens += len(gen.vlm.tok(rec["text"], add_special_tokens=False)["input_ids"])
    return {
        "load_s": round(load_s, 1),
        "generate_s": [round(t, 2) for t in times],
        "generated_tokens_per_s": round(tokens / sum(times), 1),
        "decoding": "beam 3, no_repeat_ngram 3, repetition_penalty 1.2 (generate.REPORT_DECODING)",
    }


def lora_cost(steps: int, batch: int, prompt_len: int = 256, target_len: int = 80, visual_dim: int = 1280) -> dict:
    """Training tokens/s of SmolLM2 + LoRA (r 8, every linear layer, the new token rows) + projector: `steps`
    AdamW steps on batches of `batch` rows of a realistic length (prompt budget 256, 80 answer tokens, a 4x4 grid
    of 1280-wide cxr-small tokens), timed after one warm-up step."""
    import torch

    from generation.model.vlm import VLM

    vlm = VLM.create(visual_dim, [{"spec": "cost"}], lm_path="smollm2-135m", lora=True, lora_r=8).train()
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    visual = torch.randn(batch, 16, visual_dim, generator=gen)
    prompts = [torch.randint(0, 49152, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    targets = [torch.randint(0, 49152, (target_len,), generator=gen).tolist() for _ in range(batch)]
    times = []
    for _ in range(steps + 1):
        t0 = time.time()
        loss = vlm(visual, prompts, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.time() - t0)
    per_step = sum(times[1:]) / steps
    seq = 6 + prompt_len + target_len + 1  # the 4 grouped image tokens and 2 markers, prompt, answer, eos
    return {
        "steps": steps,
        "batch": batch,
        "seconds_per_step": round(per_step, 2),
        "train_tokens_per_s": round(batch * seq / per_step, 1),
        "trainable_params": sum(p.numel() for p in params),
    }


def _markdown(rows: list[dict], meta: dict) -> str:
    head = ["row", *COLUMNS, "copied", "vqa_closed", "vqa_open"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"]] + [("-" if r.get(c) is None else f"{r[c]:.3f}") for c in head[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n```json\n" + json.dumps(meta, indent=1, default=str) + "\n```\n"


def _save(rows: list[dict], meta: dict) -> None:
    """Write the results so far (a long run on a shared machine keeps what it finished)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation_lm_demo.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
    (RESULTS / "generation_lm_demo.md").write_text(_markdown(rows, {k: v for k, v in meta.items() if k != "rows"}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--lora-steps", type=int, default=0, help="0: no LoRA rows")
    p.add_argument("--lora-batch", type=int, default=4)
    p.add_argument("--lora-name", default="smollm2-lora", help="the LoRA run's folder under --work")
    p.add_argument("--lora-over", type=json.loads, default={}, help='VLMTrainConfig overrides, e.g. {"balance": 1.0}')
    p.add_argument("--contrast", default="", help="LoRA rows decoded contrastively at these alphas (1,2), k=0")
    p.add_argument("--drafts", type=int, default=1, help="also each --contrast row as the best of N drafts")
    p.add_argument("--ablations", default="", help="earlier LoRA folders under --work to add as rows (k=0, k=3)")
    p.add_argument("--controls", default="blank,noise,other")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--lora-cost", type=int, default=0, help="only time N LoRA training steps, print, exit")
    args = p.parse_args()
    if args.lora_cost:
        print(json.dumps({"lora_cost": lora_cost(args.lora_cost, args.lora_batch), "machine": machine_info()}))
        print("max_rss_mib", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        return
    demo, work = args.demo, args.work
    tasks = ["report", "vqa"]
    meta: dict = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[dict] = []
    zero = _train("smollm2-zero", work, demo, lm_path="smollm2-135m", steps=0, prompt_budget=256)
    res = _evaluate(zero, demo, args.n, tasks, report_source="findings")
    rows += _rows(res, "template writer", ("constant", "training prior", "retrieval-only", "vlm k=0", "vlm k=3"))
    _save(rows, meta)
    res = _evaluate(zero, demo, args.n, tasks, report_source="generate", vqa_source="lm", shuffled=True)
    rows += _rows(res, "SmolLM2 zero-shot", ("vlm k=0", "vlm k=3", "shuffled"))
    meta["samples_zero_shot"] = res["samples"].get("report", [])[:6]
    meta["seconds_per_output_zero_shot"] = res["seconds_per_output"]
    _save(rows, meta)
    if not args.skip_tiny:
        tiny_over = dict(lm_path="tiny", steps=300, lr=2e-3, prompt_budget=128, lm_overrides=TINY_SIZE)
        tiny = _train("tiny", work, demo, **tiny_over)
        res = _evaluate(tiny, demo, args.n, tasks, report_source="generate", vqa_source="lm")
        rows += _rows(res, "tiny LM", ("vlm k=0", "vlm k=3"))
        _save(rows, meta)
    probe, probe_label = zero, "SmolLM2 zero-shot"
    if args.lora_steps:
        t0 = time.time()
        lora_config = dict(lm_path="smollm2-135m", lora=True, lora_r=8, steps=args.lora_steps, lr=1e-3)
        lora_config.update(batch_size=args.lora_batch, tasks=tasks, prompt_budget=256, warmup_steps=10)
        lora = _train(args.lora_name, work, demo, **{**lora_config, **args.lora_over})
        meta["lora_train_s"] = round(time.time() - t0, 1)
        meta["lora_train_info"] = {
            k: v for k, v in json.loads((lora / "train_info.json").read_text()).items() if k != "losses"
        }
        res = _evaluate(lora, demo, args.n, tasks, report_source="generate", vqa_source="lm", shuffled=True)
        rows += _rows(res, "SmolLM2 + LoRA", ("vlm k=0", "vlm k=3", "shuffled"))
        meta["samples_lora"] = res["samples"].get("report", [])[:6]
        meta["seconds_per_output_lora"] = res["seconds_per_output"]
        res = _evaluate(lora, demo, args.n, ["report"], report_source="generate-filtered", vqa_source="lm")
        rows += _rows(res, "SmolLM2 + LoRA, label-filtered exemplars", ("vlm k=3",))
        meta["samples_lora_filtered"] = res["samples"].get("report", [])[:6]
        _save(rows, meta)
        probe, probe_label = lora, "SmolLM2 + LoRA"
        for alpha in (float(a) for a in filter(None, args.contrast.split(","))):
            res = _evaluate(lora, demo, args.n, ["report"], report_source="generate", k=0, contrast=alpha)
            rows += _rows(res, f"SmolLM2 + LoRA, contrastive decoding (alpha {alpha:g})", ("vlm k=0",))
            meta[f"samples_lora_contrast_{alpha:g}"] = res["samples"].get("report", [])[:6]
            if args.drafts > 1:  # the draft that agrees best with the finding head (draft_choice.py)
                res = _evaluate(lora, demo, args.n, ["report"], report_source="generate", k=0, contrast=alpha,
                                drafts=args.drafts)  # fmt: skip
                label = f"SmolLM2 + LoRA, contrastive (alpha {alpha:g}), best of {args.drafts}"
                rows += _rows(res, label, ("vlm k=0",))
                meta[f"samples_lora_contrast_{alpha:g}_drafts"] = res["samples"].get("report", [])[:6]
            _save(rows, meta)
    for name in filter(None, args.ablations.split(",")):  # earlier LoRA runs, as trained (see their train_info)
        full = dict(report_source="generate", vqa_source="lm", shuffled=True)  # the main run's evaluation, if cached
        done = (work / name / "bench_evals" / _key(args.n, tasks, full)).exists()
        which = (tasks, full) if done else (["report"], {**full, "shuffled": False})
        res = _evaluate(work / name, demo, args.n, *which)
        rows += _rows(res, f"ablation {name}", ("vlm k=0", "vlm k=3"))
        _save(rows, meta)
    for control in filter(None, args.controls.split(",")):  # the image controls, on the last VLM trained
        res = _evaluate(probe, demo, args.n, tasks, report_source="generate", vqa_source="lm", image_control=control)
        rows += _rows(res, f"{probe_label}, {control} image", ("vlm k=0", "vlm k=3"))
        _save(rows, meta)
    if not args.skip_cost:
        meta["cost"] = _cost(probe, demo)
    meta["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    _save(rows, meta)
    print(_markdown(rows, {"cost": meta.get("cost"), "max_rss_mib": meta["max_rss_mib"]}))


if __name__ == "__main__":
    main()
