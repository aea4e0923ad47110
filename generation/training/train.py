"""Multi-task VLM training: resumable, with a progress bar.

One run: build the examples of the training split, compute the frozen visual tokens once, precompute each
row's exemplars once (retrieval model vectors from the index, never the same study or patient, only training
studies), then train the projector + LM on batches drawn by a task rule (default: every task equally often;
seed 000's inverse-size rule stays available) with abnormal studies and rare findings re-sampled (`balance`),
optionally in two stages. With `token_cache`, the frozen visual tokens are cached on disk once per corpus.
A fraction of examples (`rag_dropout`) is trained without exemplars so that one model serves k = 0 and k > 0.
Checkpoints (`OUT/checkpoint/`) hold model, optimiser, scheduler and sampler state; `resume=True` continues
from there and draws the same batches an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from generation.data.rag import Exemplar, build_prompt_ids
from generation.data.sampling import TaskSampler, stage_tasks
from generation.data.tasks import Example, build_examples
from generation.model.language_model import DEFAULT_LM, resolve_lm
from generation.model.tokenizer import TASKS
from generation.model.vlm import TINY, VLM, load_encoder
from generation.writing.findings_prompt import TASKS as FINDINGS_TASKS
from retrieval.data.split_items import split_positions
from retrieval.errors import CXRError, UsageError
from retrieval.fileio import write_json_atomic
from retrieval.labels import LABELS, multi_hot
from retrieval.models.token_cache import DEFAULT_GRID
from retrieval.progress import make_progress
from retrieval.training_checkpoint import Checkpoint


@dataclass
class VLMTrainConfig:
    """Everything a training run depends on (saved to train_info.json)."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    encoders: list[str] = field(default_factory=list)  # empty: the index's retrieval model, else patch:1
    rag_k: int = 3
    rag_dropout: float = 0.3
    prompt_budget: int = 160
    max_target_tokens: int = 80
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    two_stage: bool = False
    stage1_fraction: float = 0.3
    checkpoint_every: int = 50
    visual_grid: int = DEFAULT_GRID  # tokens pooled to grid x grid at most
    seed: int = 0
    split: str = "train"
    lm_path: str | None = DEFAULT_LM  # a `--lm` value (language_model.resolve_lm); None or "tiny": the tiny Llama
    lora: bool = False
    lora_r: int = 8
    projector_fraction: float = 0.3  # with LoRA: the first fraction of steps trains the projector alone
    findings_in_prompt: bool = True  # [report] and [vqa] prompts carry the finding head's "Likely findings" line
    findings_line_source: str = "crossfit"  # training lines: crossfit (the head's cross-fitted errors) | labels
    lm_overrides: dict = field(default_factory=dict)
    task_rule: str = "uniform"  # uniform | inverse (seed 000) | proportional
    balance: float = 0.5  # example weight freq(rarest finding)^-balance; 0 = uniform within a task
    token_cache: str | None = None  # folder of the frozen visual-token cache (one per corpus); None = no cache
    aux_weight: float = 1.0  # auxiliary finding BCE on the projected visual tokens; 0 = off
    loss_norm: str = "example"  # example: each example's mean token loss, then the batch mean; token: all tokens
    coord_sigma: float = 1.5  # Gaussian coordinate targets (grid units); 0 = one-hot
    coord_init: bool = True  # coordinate tokens start from Fourier features of their value
    box_head: bool = True  # fit the ridge box head on the frozen tokens at the end (box_head.py)
    finding_ridge: bool = True  # fit the ridge finding head on the frozen tokens at the end (finding_ridge.py)
    segment_head: bool = True  # with a `masks` column: fit the [segment] head at the end (segment_head.py)


def resolve_encoders(specs: Sequence[str], searcher: Any | None) -> list[str]:
    """Default visual encoder: the index's retrieval model (`cxr:PATH`) when known, else a patch tower."""
    if specs:
        return list(specs)
    path = searcher.index.model_path if searcher is not None else None
    return [f"cxr:{path}"] if path else ["patch:1"]


def row_balance_keys(df: pd.DataFrame, rows: Sequence[int]) -> dict[int, str]:
    """Each row's balancing class: its rarest positive finding among `rows` (or `No Finding`)."""
    from retrieval.labels import LABELS, NO_FINDING

    labels = {
        int(p): [x for x in (df.iloc[p]["labels"] if len(df) else []) if x in LABELS and x != NO_FINDING] for p in rows
    }
    freq: dict[str, int] = {}
    for labs in labels.values():
        for lab in labs:
            freq[lab] = freq.get(lab, 0) + 1
    return {p: (min(labs, key=lambda x: (freq[x], x)) if labs else NO_FINDING) for p, labs in labels.items()}


def row_label_targets(df: pd.DataFrame, rows: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each row's multi-hot finding vector over LABELS (the auxiliary head's target)."""
    targets = multi_hot([df.iloc[p]["labels"] for p in rows]).astype(np.float32)
    return {int(p): torch.tensor(t) for p, t in zip(rows, targets, strict=True)}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def encode_batch(
    tok: Any,
    batch: Sequence[Example],
    exemplars: dict[int, list[Exemplar]],
    ks: Sequence[int],
    budget: int,
    max_target: int,
    findings: dict[int, str] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and target token ids for a batch; example i carries its row's first ks[i] exemplars, and a
    `[report]` / `[vqa]` example its row's "Likely findings" line from `findings` (row -> line) when given."""
    prompts, targets = [], []
    findings = findings or {}
    for ex, k in zip(batch, ks, strict=True):
        line = findings.get(ex.row) if ex.task in FINDINGS_TASKS else None
        ids, _ = build_prompt_ids(tok, ex.task, ex.prompt, exemplars.get(ex.row, [])[:k], budget, line)
        prompts.append(ids)
        targets.append(tok(ex.target, add_special_tokens=False)["input_ids"][:max_target])
    return prompts, targets


def _save_checkpoint(out: Path, vlm: VLM, opt, sched, sampler: TaskSampler, step: int, losses: list) -> None:
    """Commit step `step` to `OUT/checkpoint` (`retrieval.training_checkpoint`: the last committed step stays
    whole until state.json names the new one)."""
    optim = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    write = {
        "vlm": (f"step{step:07d}-vlm", vlm.save),
        "optim": (f"step{step:07d}.optim.pt", lambda path: torch.save(optim, path)),
    }
    Checkpoint(out / "checkpoint").commit({"step": step, "sampler": sampler.state_dict(), "losses": losses}, write)


@dataclass
class _Inputs:
    """What the training loop reads, computed once: examples, frozen visual tokens, exemplars, targets."""

    df: pd.DataFrame
    rows: list[int]
    examples: dict[str, list[Example]]
    encoders: list[Any]
    used_rows: list[int]
    visual: dict[int, torch.Tensor]
    bad: list[dict]
    seconds_visual: float
    exemplars: dict[int, list[Exemplar]]
    label_rows: dict[int, torch.Tensor]
    findings: dict[int, str]  # row -> its "Likely findings" prompt line (findings_prompt.py); empty when off


def _check_out(out: Path, resume: bool) -> None:
    """Refuse to overwrite a trained VLM or an unfinished run's checkpoint without `resume`."""
    if (out / "vlm_config.json").exists() and not resume and not (out / "checkpoint").exists():
        raise UsageError(f"{out} already holds a trained VLM; choose another --out or pass --resume")
    if (out / "checkpoint").exists() and not resume:
        raise UsageError(f"{out} holds a checkpoint of an unfinished run; pass --resume or choose another --out")


def _prepare_inputs(df: pd.DataFrame, config: VLMTrainConfig, index_dir: str | Path | None, progress: bool) -> _Inputs:
    """Examples of the training split, frozen visual tokens (rows whose image cannot be read are dropped and
    reported), and each row's exemplars (training studies only); resolves `config.encoders`."""
    from generation.data.features import exemplars_for_rows, open_searcher, visual_tokens_for_rows

    rows = split_positions(df, config.split)
    searcher = None
    if index_dir is not None:
        searcher = open_searcher(index_dir)
    elif config.rag_k > 0:
        raise UsageError("--rag-k > 0 needs --index (or pass --rag-k 0 to train without retrieval)")
    config.encoders = resolve_encoders(config.encoders, searcher)
    examples = build_examples(df, config.tasks, rows, seed=config.seed)
    if not examples:
        raise CXRError(f"the {config.split} split yields no examples for tasks {config.tasks}")

    encoders = [load_encoder(s) for s in config.encoders]
    used_rows = sorted({ex.row for exs in examples.values() for ex in exs})
    t_vis = time.time()
    visual, bad = visual_tokens_for_rows(
        df, used_rows, encoders, config.visual_grid, progress=progress, cache_dir=config.token_cache
    )
    t_vis = time.time() - t_vis
    if not visual:
        raise CXRError("no readable training image (see the bad rows above)")
    examples = {t: [e for e in exs if e.row in visual] for t, exs in examples.items()}
    examples = {t: exs for t, exs in examples.items() if exs}

    exemplars: dict[int, list[Exemplar]] = {}
    if searcher is not None and config.rag_k > 0 and config.steps > 0:  # zero-shot (0 steps): no training prompt
        train_studies = {str(s) for s in df.iloc[rows]["study_id"]}
        exemplars = exemplars_for_rows(df, sorted(visual), searcher, config.rag_k, allowed_studies=train_studies)
    label_rows = row_label_targets(df, used_rows)
    findings = {}
    if config.findings_in_prompt and set(FINDINGS_TASKS) & set(examples) and config.steps > 0:
        from generation.writing.findings_prompt import findings_lines

        findings = findings_lines(df, visual, label_rows, config.seed, config.findings_line_source)
    return _Inputs(df, rows, examples, encoders, used_rows, visual, bad, t_vis, exemplars, label_rows, findings)


def _create_or_resume(config: VLMTrainConfig, data: _Inputs, state: dict | None, ck: Checkpoint) -> VLM:
    """The VLM of the checkpoint's step (`state`), or a new one whose vocabulary covers the training text."""
    if state is not None:
        vlm = VLM.load(ck.path("vlm", state), trainable=True)
    else:
        exs = [e for es in data.examples.values() for e in es]
        corpus = [e.target for e in exs] + [e.prompt for e in exs]
        corpus += list({x.report for xs in data.exemplars.values() for x in xs})
        enc_meta = [
            {"spec": s, "name": str(getattr(e, "name", s))} for s, e in zip(config.encoders, data.encoders, strict=True)
        ]
        vlm = VLM.create(
            next(iter(data.visual.values())).shape[-1],
            enc_meta,
            config.lm_path,
            config.lora,
            config.lora_r,
            config.lm_overrides,
            config.seed,
            corpus,
            aux_labels=len(LABELS) if config.aux_weight > 0 else 0,
            coord_sigma=config.coord_sigma,
            coord_init=config.coord_init,
            loss_norm=config.loss_norm,
        )
    vlm.config.visual_grid = config.visual_grid
    vlm.config.prompt_budget = config.prompt_budget
    vlm.config.tasks = list(data.examples)
    vlm.config.rag_k = config.rag_k
    vlm.config.findings_in_prompt = config.findings_in_prompt and bool(set(FINDINGS_TASKS) & set(data.examples))
    vlm.config.image_in_prompt = config.steps > 0  # zero-shot (no step): an untrained projector would be noise
    return vlm


def _optimisation(config: VLMTrainConfig, vlm: VLM, data: _Inputs, state: dict | None, ck: Checkpoint):
    """(trainable params, AdamW, warmup-cosine scheduler, task sampler), restored from the checkpoint if any."""
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, config.steps))
    keys = row_balance_keys(data.df, data.used_rows)
    sampler = TaskSampler(
        data.examples, seed=config.seed, task_rule=config.task_rule, balance=config.balance, keys=lambda e: keys[e.row]
    )
    if state is not None:
        opt_state = torch.load(ck.path("optim", state), weights_only=True)
        opt.load_state_dict(opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
        sampler.load_state_dict(state["sampler"])
    return params, opt, sched, sampler


def _train_steps(
    config: VLMTrainConfig,
    vlm: VLM,
    data: _Inputs,
    optim: tuple,
    start: int,
    losses: list[float],
    out: Path,
    progress: bool,
) -> dict[str, int]:
    """Steps `start`..`config.steps` (appending to `losses`, checkpointing every `checkpoint_every`); returns the
    number of examples drawn per task."""
    params, opt, sched, sampler = optim
    draws: dict[str, int] = {}
    vlm.train()
    # a pretrained LM with LoRA: the projector alone first (LLaVA-Rad, AnatomiX), then projector + LoRA
    lm_params = [p for p in vlm.lm.parameters() if p.requires_grad] if vlm.config.lora else []
    projector_steps = int(config.steps * config.projector_fraction) if lm_params else 0
    with make_progress(disable=not progress) as bar:
        task = bar.add_task("training VLM", total=config.steps, completed=start, unit="steps")
        for step in range(start, config.steps):
            active = stage_tasks(step, config.steps, list(data.examples), config.two_stage, config.stage1_fraction)
            batch = sampler.sample(config.batch_size, active)
            for p in lm_params:
                p.requires_grad_(step >= projector_steps)
            for ex in batch:
                draws[ex.task] = draws.get(ex.task, 0) + 1
            rng = np.random.default_rng([config.seed, step])
            ks = [0 if rng.random() < config.rag_dropout else config.rag_k for _ in batch]
            prompts, targets = encode_batch(
                vlm.tok, batch, data.exemplars, ks, config.prompt_budget, config.max_target_tokens, data.findings
            )
            vis = torch.stack([data.visual[ex.row] for ex in batch]).float()
            aux_t = torch.stack([data.label_rows[ex.row] for ex in batch]) if config.aux_weight > 0 else None
            loss = vlm(vis, prompts, targets, aux_t, config.aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(round(float(loss.detach()), 4))
            bar.update(task, advance=1, description=f"training VLM (loss {np.mean(losses[-20:]):.3f})")
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _save_checkpoint(out, vlm, opt, sched, sampler, step + 1, losses)
    return draws


def _finish(config: VLMTrainConfig, vlm: VLM, data: _Inputs, out: Path) -> float:
    """Fit the finding head's thresholds, save the VLM and fit + save the box head, the finding ridge and (with
    region masks) the segment head; returns the seconds of the closed-form heads."""
    vlm.eval()
    if vlm.aux_head is not None:  # thresholds for closed answers from the finding head (head.py)
        from generation.heads.head import aux_head_thresholds

        vlm.config.head_thresholds = aux_head_thresholds(vlm, data.visual, data.label_rows)
    vlm.save(out, data.encoders)
    t_box = time.time()
    if config.box_head:
        from generation.heads.box_head import fit_for_examples

        if (head := fit_for_examples(data.visual, data.examples)) is not None:
            head.save(out)
    if config.finding_ridge:
        from generation.heads.finding_ridge import fit_finding_ridge

        if (ridge := fit_finding_ridge(data.visual, data.label_rows)) is not None:
            ridge.save(out)
    if config.segment_head and "masks" in data.df.columns:  # [segment]: the region masks a manifest carries
        from generation.heads.segment_head import fit_for_manifest

        if (seg := fit_for_manifest(data.visual, data.df)) is not None:
            seg.save(out)
    return time.time() - t_box


def train_vlm(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    config: VLMTrainConfig | None = None,
    index_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train on the manifest's training split; writes the VLM folder to `out_dir`; returns run info."""
    from retrieval.data.manifest import read_manifest

    config = config or VLMTrainConfig()
    if config.lm_path not in (None, TINY):
        resolve_lm(config.lm_path)  # a --lm that points nowhere fails before any image is read
    out = Path(out_dir)
    _check_out(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(config.seed)
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    data = _prepare_inputs(df, config, index_dir, progress)

    ck = Checkpoint(out / "checkpoint")
    state = ck.state(verify=True) if resume else None
    start, losses = (int(state["step"]), list(state["losses"])) if state is not None else (0, [])
    vlm = _create_or_resume(config, data, state, ck)
    optim = _optimisation(config, vlm, data, state, ck)
    t_train = time.time()
    draws = _train_steps(config, vlm, data, optim, start, losses, out, progress)
    t_box = _finish(config, vlm, data, out)
    info = {
        "config": asdict(config),
        "index": str(index_dir) if index_dir else None,
        "train_rows": len(data.rows),
        "bad_rows": data.bad,
        "task_sizes": {t: len(v) for t, v in data.examples.items()},
        "task_weights": optim[3].weights(),
        "steps": config.steps,
        "loss_first20": float(np.mean(losses[:20])) if losses else None,
        "loss_last20": float(np.mean(losses[-20:])) if losses else None,
        "losses": losses,
        "params_trainable": int(sum(p.numel() for p in optim[0])),
        "vocab_size": len(vlm.tok),
        "task_draws": draws,
        "seconds_visual_tokens": round(data.seconds_visual, 1),
        "seconds_training": round(time.time() - t_train - t_box, 1),
        "seconds_box_head": round(t_box, 1),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out / "train_info.json", info)
    if ck.folder.exists():
        import shutil

        shutil.rmtree(ck.folder)
    return info
