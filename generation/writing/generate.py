"""Decoding with a trained VLM: visual tokens + task + prompt + top-k retrieved exemplars -> answers (`Generator`).

Where each kind of answer comes from (the heads or the LM) is the `GeneratorOptions` the Generator holds; the
one-image entry point (`cxr generate`, `cxr demo`) is `image_answer.generate_for_image`. An answer holds the text,
the task, the boxes parsed from it (identify / ground / where-questions; malformed ones are dropped and counted),
the exemplars the prompt carried (`ref` = the number the prompt gave them, study ids, scores) and which of them
the output copied sentences from.

Decoding uses transformers' own controls, per task (`DECODING`): reports get beam search with
`no_repeat_ngram_size` and `repetition_penalty` (a small greedy decoder otherwise loops on "the lungs are
clear."); short answers and boxes stay greedy (an n-gram ban would forbid a second box of the same label).
Boxes are decoded under a grammar (`constraints.py`, transformers' `prefix_allowed_tokens_fn`): four coordinates,
x1 < x2, y1 < y2, closed by `}`, so a generated box is never malformed (`constrain_boxes=False` turns it off, to
measure what it does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generation.data.boxes import boxes_text, malformed_boxes, parse_boxes
from generation.data.rag import Exemplar, build_prompt_ids, copied_sentences
from generation.data.tasks import OPEN_QUESTION, PROMPTS, classify_target
from generation.heads.box_head import BoxHead, box_features
from generation.heads.finding_ridge import FindingRidge
from generation.heads.head import agreeing_exemplars, closed_answer, predicted_findings, rank_exemplars
from generation.heads.segment_head import SegmentHead
from generation.model.contrast import contrast_processors
from generation.model.encoders import encode_visual
from generation.model.tokenizer import TASKS, decode
from generation.model.vlm import VLM
from generation.writing.constraints import box_decoding
from generation.writing.draft_choice import pick_draft
from generation.writing.findings_prompt import NONE_LINE, findings_line
from generation.writing.findings_prompt import TASKS as FINDINGS_TASKS
from generation.writing.findings_report import finding_sides, findings_report
from generation.writing.generator_options import GeneratorOptions
from generation.writing.lm_answers import is_closed, lm_closed_answers
from retrieval.device import resolve_device
from retrieval.errors import UsageError
from retrieval.labels import LABELS
from retrieval.text_limits import check_query_text

MAX_NEW_TOKENS = {"report": 96, "vqa": 32, "classify": 32, "identify": 64, "ground": 24}
REPORT_DECODING: dict[str, Any] = {"num_beams": 3, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
DECODING: dict[str, dict[str, Any]] = {
    "report": REPORT_DECODING,
    "vqa": {},
    "classify": {},
    "identify": {},
    "ground": {},
}


# the drafts after the first (`report_decoding(drafts=N)`): sampled at the first draft's contrast, seeded per batch
DRAFT_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_beams": 1}
DRAFT_SEED = 0


def report_decoding(contrast: float = 0.0, drafts: int = 1) -> dict[str, dict[str, Any]] | None:
    """The `decoding` of a `Generator` whose LM-written `[report]` is decoded contrastively at strength `contrast`
    (model/contrast.py; one beam, so the contrast pass keeps its KV cache) and chosen among `drafts` drafts (the
    greedy one and `drafts - 1` samples; draft_choice.py keeps the one that agrees best with the finding head);
    None for the default decoding (0 and 1)."""
    if contrast < 0:
        raise UsageError(f"--contrast must be >= 0, got {contrast}")
    if drafts < 1:
        raise UsageError(f"--drafts must be >= 1, got {drafts}")
    if not contrast and drafts == 1:
        return None
    return {"report": {**REPORT_DECODING, "num_beams": 1, "contrast": float(contrast), "drafts": int(drafts)}}


def where_phrase(question: str) -> str | None:
    """X of a "where is the X?" question, else None."""
    q = question.strip().lower()
    if q.startswith("where is the ") and q.endswith("?"):
        return q.removeprefix("where is the ").removesuffix("?").strip()
    return None


def task_prompt(task: str, question: str | None = None, phrase: str | None = None) -> str:
    """The instruction text for `task` (VQA needs a question, grounding a phrase)."""
    if task not in (*TASKS, SEGMENT_TASK):
        raise UsageError(f"unknown task {task!r}; choose from {', '.join((*TASKS, SEGMENT_TASK))}")
    check_query_text(question, "the question")
    check_query_text(phrase, "the phrase")
    if task == "vqa":
        return (question or OPEN_QUESTION).strip().lower()
    if task in ("ground", SEGMENT_TASK):
        if not phrase or not phrase.strip():
            raise UsageError(f"--task {task} needs --phrase (an anatomy or finding, e.g. 'right lung')")
        return phrase.strip().lower()
    return PROMPTS[task]


DETECTOR_DIR = "detector"  # `cxr vlm detector --out VLM_DIR/detector`: the VLM answers boxes from it
DETECTOR_TASKS = ("identify", "ground")
SEGMENT_TASK = "segment"  # answered by the segment head alone (segment_head.py), never by the LM


class Generator:
    """A loaded VLM (+ its frozen encoders) and, optionally, the index its exemplars come from."""

    def __init__(
        self,
        vlm_dir: str | Path,
        index_dir: str | Path | None = None,
        device: str | None = None,
        retrieval_model: Any = None,
        decoding: dict[str, dict[str, Any]] | None = None,
        token_cache: str | Path | None = None,
        constrain_boxes: bool = True,
        options: GeneratorOptions | None = None,
    ):
        self.vlm_dir = Path(vlm_dir)
        self.constrain_boxes = constrain_boxes
        self.options = options = options or GeneratorOptions()
        self.decoding = {**DECODING, **(decoding or {})}
        self.token_cache = token_cache
        self.device = resolve_device(device)  # None and "auto" alike: CUDA when torch sees it
        self.vlm = VLM.load(vlm_dir, device=self.device)
        self.encoders = self.vlm.load_encoders(vlm_dir, device=self.device)
        self.box_head = BoxHead.load(vlm_dir) if options.box_source == "head" else None
        self.finding_ridge = FindingRidge.load(vlm_dir) if options.finding_source == "ridge" else None
        self.grid = self.vlm.config.visual_grid
        self.budget = int(self.vlm.config.prompt_budget)
        self.searcher = None
        self._retrieval_model = retrieval_model
        if index_dir is not None:
            from generation.data.features import open_searcher

            self.searcher = open_searcher(index_dir)

    @functools.cached_property
    def detector(self) -> Any:
        """The trained detector saved as `VLM_DIR/detector`, loaded once on first use (`cxr serve` asks per request);
        None without one."""
        folder = self.vlm_dir / DETECTOR_DIR
        if not (folder / "detector.json").is_file():
            return None
        from generation.heads.detector import Detector

        return Detector.load(folder)

    @functools.cached_property
    def segment_head(self) -> SegmentHead | None:
        """The `[segment]` head saved in the VLM folder (fitted by `cxr vlm train` on a manifest with region
        masks), loaded once on first use; None without one."""
        return SegmentHead.load(self.vlm_dir)

    def visual(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Combined, pooled visual tokens for HxW [0, 1] arrays."""
        return encode_visual(self.encoders, images, grid=self.grid)[0]

    def retrieval_model(self) -> Any:
        """The model the index was built with (a VLM encoder with the same fingerprint is reused)."""
        if self._retrieval_model is None:
            want = self.searcher.index.info.get("model", {}).get("fingerprint")
            same = [e for e in self.encoders if str(getattr(e, "fingerprint", "")) == str(want)]
            if same:
                self._retrieval_model = same[0]
            else:
                self._retrieval_model = self.searcher.index.load_model()
        return self._retrieval_model

    def exemplars_for_images(
        self,
        images: Sequence[np.ndarray],
        k: int,
        exclude_studies: Sequence[str | None] | None = None,
        exclude_patients: Sequence[str | None] | None = None,
    ) -> list[list[Exemplar]]:
        """Top-k exemplars per image from the index (none when k = 0 or there is no index)."""
        if k <= 0:
            return [[] for _ in images]
        if self.searcher is None:
            raise UsageError("retrieval needs --index (or pass -k 0)")
        from generation.data.rag import retrieve_exemplars

        vecs = np.asarray(self.retrieval_model().encode_images(list(images)), dtype=np.float32)
        n = len(images)
        return retrieve_exemplars(
            self.searcher, vecs, k, list(exclude_studies or [None] * n), list(exclude_patients or [None] * n)
        )

    @torch.no_grad()
    def generate(
        self,
        visual: torch.Tensor,
        tasks: Sequence[str],
        prompts: Sequence[str],
        exemplars: Sequence[Sequence[Exemplar]],
        batch_size: int = 32,
    ) -> list[dict]:
        """One answer per (visual, task, prompt, exemplars): {text, task, prompt, exemplars, copied, boxes}, and
        for `[identify]` from the box head its `detections` (every finding group, scored: what mAP ranks).

        Batches hold one task each, so every task decodes with its own `DECODING` controls."""
        out: list[dict | None] = [None] * len(tasks)
        for task in dict.fromkeys(tasks):
            idx = [i for i, t in enumerate(tasks) if t == task]
            for start in range(0, len(idx), batch_size):
                part = idx[start : start + batch_size]
                recs = self._generate_batch(
                    visual[part], task, [prompts[i] for i in part], [exemplars[i] for i in part]
                )
                for i, rec in zip(part, recs, strict=True):
                    out[i] = rec
        return [r for r in out if r is not None]

    def finding_probs(
        self, visual: torch.Tensor, features: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, list[float] | None]:
        """(B, L) finding probabilities and their thresholds: the finding ridge's when loaded, else the VLM's
        auxiliary head's (None, None without either). `features`: `box_features(visual)` when the caller has them."""
        if self.finding_ridge is not None:
            feats = box_features(visual) if features is None else features
            return self.finding_ridge.probs(feats), list(self.finding_ridge.thresholds)
        probs = self.vlm.finding_probs(visual)
        return (None if probs is None else probs.cpu().numpy()), self.vlm.config.head_thresholds

    def _box_answers(self, features: np.ndarray | None, task: str, prompts: Sequence[str]) -> list[list[dict] | None]:
        """The box head's boxes (`[identify]`'s with their `score`) from the batch's `box_features`, None where it
        has none: no head, another task, an unknown phrase."""
        none: list[list[dict] | None] = [None] * len(prompts)
        if self.box_head is None or features is None or task not in ("ground", "identify", "vqa"):
            return none
        if task == "identify":
            return list(self.box_head.identify(features))
        phrases = [p if task == "ground" else where_phrase(p) for p in prompts]
        if all(ph is None for ph in phrases):
            return none
        known = self.box_head.ground(features, [ph or "" for ph in phrases])
        return [a if ph is not None else None for a, ph in zip(known, phrases, strict=True)]

    def _lm_answers(
        self, visual: torch.Tensor, task: str, prompts: Sequence[str], ids: list, controls: dict, decode_none: bool
    ) -> tuple[list[list[int]], dict[int, str]]:
        """(decoded token ids per prompt, {position: "yes"/"no"}): closed "is there X?" questions that the LM
        answers (`vqa_source="lm"`) are scored, not decoded (lm_answers.py); the rest are decoded unless
        `decode_none` (an answer that another source gives) or there is nothing left."""
        lm_vqa = task == "vqa" and self.options.vqa_source == "lm"
        closed = [i for i, p in enumerate(prompts) if lm_vqa and is_closed(p)]
        picked = dict(zip(closed, lm_closed_answers(self.vlm, visual[closed], [ids[i] for i in closed]), strict=True))
        gen: list[list[int]] = [[] for _ in prompts]
        decoded = [i for i in range(len(prompts)) if i not in picked]
        if decoded and not decode_none:
            new = self.vlm.generate(visual[decoded], [ids[i] for i in decoded], MAX_NEW_TOKENS[task], **controls)
            for i, g in zip(decoded, new, strict=True):
                gen[i] = g
        return gen, picked

    def _contrast(
        self, controls: dict, task: str, prompts: Sequence[str], exemplars: Sequence[Sequence[Exemplar]], lines: list
    ) -> dict:
        """`controls` with its `contrast` alpha (`DECODING["report"]`, 0 = off) made into the contrastive logits
        processor (model/contrast.py) for a `[report]` written from "Likely findings" lines: the contrast prompt is
        the same prompt whose line says none."""
        alpha = float(controls.pop("contrast", 0.0) or 0.0)
        if not alpha or task != "report" or not any(lines):
            return controls
        ids = [
            build_prompt_ids(self.vlm.tok, task, p, ex, self.budget, NONE_LINE)[0] for p, ex in zip(prompts, exemplars)
        ]
        beams = int(controls.get("num_beams", 1))
        return {**controls, "logits_processor": contrast_processors(self.vlm, ids, alpha, beams)}

    def _pick_drafts(
        self,
        visual: torch.Tensor,
        controls: dict,
        prompts: Sequence[str],
        exemplars: Sequence[Sequence[Exemplar]],
        lines: list,
        ids: list,
        first: list[list[int]],
        n: int,
        findings: Sequence[Sequence[str]],
    ) -> tuple[list[list[int]], list[float | None]]:
        """Each row's best of `n` report drafts and its agreement (draft_choice.py): the row's `first` (greedy)
        draft and `n - 1` drafts sampled (`DRAFT_SAMPLING`, seeded) at the same contrast."""
        m = n - 1

        def rep(xs: Sequence) -> list:
            return [x for x in xs for _ in range(m)]

        sampled = self._contrast({**controls, **DRAFT_SAMPLING}, "report", rep(prompts), rep(exemplars), rep(lines))
        with torch.random.fork_rng():  # the caller's random state is left as it was
            torch.manual_seed(DRAFT_SEED)
            more = self.vlm.generate(visual.repeat_interleave(m, 0), rep(ids), MAX_NEW_TOKENS["report"], **sampled)
        chosen, agreed = [], []
        for i, draft in enumerate(first):
            pool = [draft, *more[i * m : (i + 1) * m]]
            best, score = pick_draft([decode(self.vlm.tok, d) for d in pool], findings[i])
            chosen.append(pool[best])
            agreed.append(round(score, 3))
        return chosen, agreed

    def _generate_batch(
        self, visual: torch.Tensor, task: str, prompts: Sequence[str], exemplars: Sequence[Sequence[Exemplar]]
    ) -> list[dict]:
        tok = self.vlm.tok
        controls = dict(self.decoding[task])
        if self.constrain_boxes:
            controls.update(box_decoding(tok, task, prompts))
        heads = self.box_head is not None or self.finding_ridge is not None
        feats = box_features(visual) if heads else None  # pooled once for every head that reads the tokens
        probs, thresholds = self.finding_probs(visual, feats)
        found = [predicted_findings(p, thresholds) for p in probs] if probs is not None else None  # the head's
        opt = self.options
        quote = task == "report" and opt.report_source == "quote" and probs is not None
        head = probs is not None and thresholds is not None
        written = task == "report" and opt.report_source == "findings" and head
        # the LM writes the report / answers from the heads' "Likely findings" line (a VLM trained or prompted with it)
        lm_report = task == "report" and opt.report_source in ("generate", "generate-filtered")
        by_lm = lm_report or (task == "vqa" and opt.vqa_source == "lm")
        lined = task in FINDINGS_TASKS and by_lm and head and self.vlm.config.findings_in_prompt
        from_head = task == "vqa" and opt.vqa_source == "head" and head
        classified = task == "classify" and opt.classify_source == "head" and head
        boxed = self._box_answers(feats, task, prompts)
        # every finding group scored: mAP's ranked list for [identify], the findings' sides for the written report
        scoring = self.box_head is not None and (task == "identify" or written or lined)
        scored = self.box_head.detections(feats) if scoring else None
        sided = [finding_sides(d) for d in scored] if (written or lined) and scored is not None else None
        lines = [None] * len(prompts)
        if lined:
            lines = [findings_line(probs[i], thresholds, sided[i] if sided else None) for i in range(len(prompts))]
        if lined and lm_report and opt.report_source == "generate-filtered":  # LaB-RAG: exemplars that agree
            exemplars = [agreeing_exemplars(ex, probs[i], thresholds) for i, ex in enumerate(exemplars)]
        built = [build_prompt_ids(tok, task, *row, self.budget, ln) for *row, ln in zip(prompts, exemplars, lines)]
        ids, used = [b[0] for b in built], [b[1] for b in built]
        skip = written or classified or (quote and all(exemplars)) or all(b is not None for b in boxed)
        drafts, base = int(controls.pop("drafts", 1)), dict(controls)  # base: before the contrast processor
        controls = self._contrast(controls, task, prompts, exemplars, lines)
        gen, picked = self._lm_answers(visual, task, prompts, ids, controls, decode_none=skip)
        agreed: list[float | None] = [None] * len(prompts)  # the chosen draft's agreement with head_findings
        if drafts > 1 and lm_report and lined and not skip:
            gen, agreed = self._pick_drafts(visual, base, prompts, exemplars, lines, ids, gen, drafts, found)
        out: list[dict] = []
        for i, (p, g, u) in enumerate(zip(prompts, gen, used, strict=True)):
            text, source = decode(tok, g), "lm"
            if i in picked:
                text, source = picked[i], "lm (yes/no scored)"
            if from_head and (answer := closed_answer(p, probs[i], thresholds)) is not None:
                text, source = answer, "finding head"
            if classified:
                text, source = classify_target(found[i]), "finding head"
            if boxed[i] is not None:
                text, source = boxes_text(task, boxed[i]), "box head"
            if quote and exemplars[i]:
                best = rank_exemplars(exemplars[i], probs[i])[0]
                text, source = best.report, "quoted exemplar"
                u = list(exemplars[i])
            extra = {"findings_line": lines[i]} if lines[i] else {}
            if lined:
                extra["head_findings"] = found[i]
            extra |= {"draft_agreement": agreed[i]} if agreed[i] is not None else {}
            if written:
                rep = findings_report(probs[i], thresholds, exemplars[i], sides=None if sided is None else sided[i])
                text, source, u = rep.text, "finding head + exemplars", list(exemplars[i])
                extra["head_findings"] = rep.findings
            rec = {
                "source": source,
                "task": task,
                "prompt": p,
                "text": text,
                "exemplars": [{"ref": r, **e.to_dict(False)} for r, e in enumerate(u, start=1)],
                "copied": copied_sentences(text, u) if task == "report" else [],
                **extra,
            }
            if task in ("identify", "ground") or (task == "vqa" and "{" in text):
                rec["boxes"] = boxed[i] if boxed[i] is not None else parse_boxes(text, LABELS)
                rec["malformed_boxes"] = malformed_boxes(text)[1]
            if task == "identify" and scored is not None:
                rec["detections"] = scored[i]
            out.append(rec)
        return out
