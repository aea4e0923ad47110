"""Generation benchmark: train the VLM on a manifest's train split and evaluate every task on its test split with
the baselines in the same run (constant, retrieval-only, VLM k=0, VLM k=1/3/5), over several seeds and arms.

    python -m benchmarks.generation_runs --manifest M --index IDX --name demo --seeds 0,1,2 \
        --arm main --arm inverse:task_rule=inverse --arm nobalance:balance=0

An arm is `NAME[:key=value,...]` overriding `VLMTrainConfig` fields (`encoders=cxr:A+lite:lite2` for two
encoders). A variant (`--variant lm-vqa:tasks=vqa,vqa_source=lm`) evaluates each trained VLM again with other
generator options (`evaluate_generation` keywords) and adds its rows as `vlm k=K [NAME]`. Each seed's VLM
folder lands under --work (an existing folder with train_info.json is evaluated, not retrained); the frozen
visual tokens are cached once in `--work/visual_tokens` and shared by every arm and seed.
Results: benchmarks/results/generation_NAME.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waiting on busy machines

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, machine_info  # noqa: E402


def _parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    over: dict[str, Any] = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=", 1)
        if k == "encoders":
            over[k] = v.split("+")
        elif k == "tasks":
            over[k] = v.split("+")
        else:
            try:
                over[k] = json.loads(v)
            except json.JSONDecodeError:
                over[k] = v
    return name, over


def _mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "-"
    if all(isinstance(v, int) for v in vals):
        return str(vals[0]) if len(set(vals)) == 1 else "/".join(map(str, vals))
    return f"{np.mean(vals):.3f}" + (f" ± {np.std(vals):.3f}" if len(vals) > 1 else "")


def summarise(runs: list[dict]) -> str:
    """Markdown: per arm and task, each condition's metrics as mean ± std over seeds."""
    lines: list[str] = []
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        train_s = [r["train"]["seconds_training"] for r in rs]
        vis_s = [r["train"]["seconds_visual_tokens"] for r in rs]
        lines += [
            f"## arm `{arm}` ({len(rs)} seed(s): {', '.join(str(r['seed']) for r in rs)})",
            "",
            f"config overrides: `{json.dumps(rs[0]['overrides'])}`; training {_mean_std(train_s)} s "
            f"(+ visual tokens {_mean_std(vis_s)} s); task draws (seed {rs[0]['seed']}): "
            f"`{json.dumps(rs[0]['train'].get('task_draws'))}`",
            "",
        ]
        for task, conds in rs[0]["eval"]["tasks"].items():
            cols = [c for c in next(iter(conds.values())) if c not in ("gt_boxes",)]
            lines += [f"### [{task}]", "", "| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for cond in conds:
                vals = [_mean_std([r["eval"]["tasks"][task].get(cond, {}).get(c) for r in rs]) for c in cols]
                lines.append(f"| {cond} | " + " | ".join(vals) + " |")
            lines.append("")
        rag = rs[0]["eval"].get("rag") or {}
        if rag:
            cols = list(next(iter(rag.values())))
            lines += ["### RAG diagnostics ([report], abnormal queries)", ""]
            lines += ["| k | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for kk in rag:
                lines.append(
                    f"| {kk} | " + " | ".join(_mean_std([r["eval"]["rag"][kk].get(c) for r in rs]) for c in cols) + " |"
                )
            lines.append("")
        per = rs[0]["eval"].get("seconds_per_output") or {}
        if per:
            lines += [
                "generation seconds per output (seed {}): ".format(rs[0]["seed"])
                + ", ".join(f"{k} {v}" for k, v in per.items()),
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    from generation.evaluation.evaluate_generation import evaluate_generation
    from generation.training.train import VLMTrainConfig, train_vlm
    from retrieval.data.manifest import read_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--index")
    ap.add_argument("--name", required=True)
    ap.add_argument("--work", default="/tmp/genbench")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arm", action="append", default=[])
    ap.add_argument("--ks", default="1,3,5")
    ap.add_argument("--max-per-task", type=int, default=120)
    ap.add_argument("--retrieval-target", default="reports")
    ap.add_argument("--base", default="{}", help="JSON VLMTrainConfig fields shared by every arm")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:tasks=a+b,option=value: the same VLM evaluated again with other generator options",
    )
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/generation_NAME)")
    args = ap.parse_args()

    df = read_manifest(args.manifest)
    work = Path(args.work) / args.name
    base = json.loads(args.base)
    runs = []
    for arm_text in args.arm or ["main"]:
        arm, over = _parse_arm(arm_text)
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = VLMTrainConfig(**{**base, **over, "seed": seed, "token_cache": str(work / "visual_tokens")})
            out = work / f"{arm}-s{seed}"
            if (out / "train_info.json").exists():
                info = json.loads((out / "train_info.json").read_text())
            else:
                info = train_vlm(df, out, cfg, index_dir=args.index, progress=False)
            t0 = time.time()
            res = evaluate_generation(
                out,
                df,
                args.index,
                split="test",
                k=[int(k) for k in args.ks.split(",")] if cfg.rag_k > 0 else [],
                max_per_task=args.max_per_task,
                meteor=False,
                seed=0,
                progress=False,
                retrieval_target=args.retrieval_target,
                token_cache=work / "visual_tokens",
                shuffled=True,
            )
            for variant in args.variant:
                _add_variant(res, variant, out, df, args, cfg)
            info.pop("losses", None)
            runs.append(
                {"arm": arm, "seed": seed, "overrides": over, "train": info, "eval": res, "eval_s": time.time() - t0}
            )
            print(f"{arm} seed {seed}: train {info['seconds']} s, eval {time.time() - t0:.0f} s", flush=True)
            _write(args, runs)  # after every run: an interrupted benchmark keeps what it measured
    print(summarise(runs))


def _add_variant(res: dict, text: str, out: Path, df: Any, args: argparse.Namespace, cfg: Any) -> None:
    """Evaluate the same VLM again with other generator options (`NAME:tasks=a+b,option=value`, e.g.
    `lm-vqa:tasks=vqa,vqa_source=lm`; `ks=1+5` for other k) and add its VLM rows to `res` as `vlm k=K [NAME]`."""
    from generation.evaluation.evaluate_generation import evaluate_generation
    from generation.writing.generator_options import GeneratorOptions

    name, over = _parse_arm(text)
    tasks = over.pop("tasks", None)
    ks = str(over.pop("ks", args.ks.replace(",", "+")))
    rest = dict(over)
    options = GeneratorOptions.pop_from(rest)  # the `*_source` keys; the rest are evaluate_generation keywords
    other = evaluate_generation(
        out,
        df,
        args.index,
        split="test",
        k=[int(k) for k in ks.split("+")] if cfg.rag_k > 0 else [],
        tasks=tasks,
        max_per_task=args.max_per_task,
        meteor=False,
        seed=0,
        progress=False,
        retrieval_target=args.retrieval_target,
        token_cache=Path(args.work) / args.name / "visual_tokens",
        options=options,
        **rest,
    )
    for task, conds in other["tasks"].items():
        for cond, m in conds.items():
            if cond.startswith("vlm"):
                res["tasks"][task][f"{cond} [{name}]"] = m
    for kk, m in other.get("rag", {}).items():
        res.setdefault("rag", {})[f"{kk} [{name}]"] = m
    res.setdefault("variants", {})[name] = {"tasks": tasks, "options": over}


def _write(args: argparse.Namespace, runs: list[dict]) -> None:
    stem = Path(args.out) if args.out else RESULTS / f"generation_{args.name}"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": machine_info(), "args": vars(args), "runs": runs}, indent=1, default=str)
    )
    stem.with_suffix(".md").write_text(summarise(runs))


if __name__ == "__main__":
    main()
