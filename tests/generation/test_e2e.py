"""A tiny end-to-end run on CPU: train (with RAG) -> resume -> generate -> evaluate -> CLI, on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gen_synth import (
    SynthRetrievalModel,
    make_index,
    make_manifest,
    one_thread,  # noqa: F401 (an autouse fixture)
    tiny_vlm_config,
)

from generation.evaluation.evaluate_generation import evaluate_generation
from generation.model.vlm import VLM
from generation.training.train import VLMTrainConfig, train_vlm
from generation.writing.generator_options import GeneratorOptions
from generation.writing.image_answer import generate_for_image
from retrieval.errors import UsageError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    df = make_manifest(root)
    return root, df, make_index(df, root / "index")


def config(steps: int) -> VLMTrainConfig:
    return tiny_vlm_config(steps, checkpoint_every=20)


@pytest.fixture(scope="module")
def trained(corpus):
    root, df, idx = corpus
    info = train_vlm(df, root / "vlm", config(120), index_dir=idx, progress=False)
    return root / "vlm", info


def test_training_learns_and_saves(trained):
    vlm_dir, info = trained
    assert info["loss_last20"] < 0.5 * info["loss_first20"]
    assert set(info["task_sizes"]) == {"report", "vqa", "classify", "identify", "ground"}
    # default task rule: every task equally often, and every task was drawn
    sizes, w = info["task_sizes"], info["task_weights"]
    assert w == pytest.approx({t: 1 / len(sizes) for t in sizes})
    assert all(info["task_draws"][t] > 0 for t in sizes)
    assert not (vlm_dir / "checkpoint").exists()
    assert VLM.load(vlm_dir).config.encoders[0]["spec"] == "patch:1"


def test_generate_names_exemplars_never_own_study_or_patient(trained, corpus):
    root, df, idx = corpus
    row = df.iloc[0]
    model = SynthRetrievalModel()
    res = generate_for_image(root / row["image_path"], idx, trained[0], task="report", k=2, retrieval_model=model)
    assert res["task"] == "report" and res["text"]
    assert len(res["exemplars"]) == 2
    assert all(e["study_id"] != row["study_id"] and e["patient_id"] != row["patient_id"] for e in res["exemplars"])
    assert {"score", "study_id"} <= set(res["exemplars"][0])
    off = generate_for_image(root / row["image_path"], None, trained[0], task="ground", k=0, phrase="right lung")
    assert off["exemplars"] == [] and "boxes" in off


def test_resume_continues_where_it_stopped(corpus, monkeypatch):
    root, df, idx = corpus
    full = train_vlm(df, root / "a", config(40), index_dir=idx, progress=False)
    import generation.training.train as tr

    real, calls = tr.encode_batch, {"n": 0}

    def dies_at_25(*a, **k):
        calls["n"] += 1
        if calls["n"] == 26:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "encode_batch", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        train_vlm(df, root / "b", config(40), index_dir=idx, progress=False)
    assert json.loads((root / "b" / "checkpoint" / "state.json").read_text())["step"] == 20
    monkeypatch.setattr(tr, "encode_batch", real)
    resumed = train_vlm(df, root / "b", config(40), index_dir=idx, resume=True, progress=False)
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-3)


def test_head_answers_and_quoted_reports_say_where_they_come_from(trained, corpus):
    from generation.writing.generate import Generator
    from retrieval.labels import LABELS

    root, df, idx = corpus
    row = df.iloc[0]
    model = SynthRetrievalModel()
    assert len(VLM.load(trained[0]).config.head_thresholds) == len(LABELS)  # fitted at the end of training
    quoted = generate_for_image(
        root / row["image_path"],
        idx,
        trained[0],
        task="report",
        k=2,
        retrieval_model=model,
        options=GeneratorOptions(report_source="quote"),
    )
    reports = {str(s): str(r) for s, r in zip(df["study_id"], df["report"])}
    assert quoted["source"] == "quoted exemplar"
    assert quoted["text"] in {reports[e["study_id"]] for e in quoted["exemplars"]}
    assert quoted["copied"] and quoted["copied"][0]["study_id"] in {e["study_id"] for e in quoted["exemplars"]}
    image = [root / row["image_path"]]
    from retrieval.data.image_io import read_image

    for source, expect in (("head", "finding head"), ("lm", "lm (yes/no scored)")):
        gen = Generator(trained[0], options=GeneratorOptions(vqa_source=source))
        res = gen.generate(gen.visual([read_image(image[0])]), ["vqa"], ["is there cardiomegaly?"], [[]])[0]
        assert res["source"] == expect and res["text"] in ("yes", "no")
    open_q = gen.generate(gen.visual([read_image(image[0])]), ["vqa"], ["what abnormality is seen?"], [[]])[0]
    assert open_q["source"] == "lm"  # an open question is decoded, not scored


def test_box_head_and_written_report_answer_by_default(trained, corpus):
    from generation.writing.generate import Generator
    from retrieval.data.image_io import read_image

    root, df, idx = corpus
    assert (trained[0] / "box_head.safetensors").exists()  # fitted at the end of training
    vis_img = read_image(root / df.iloc[0]["image_path"])
    for source, expect in (("head", "box head"), ("lm", "lm")):
        gen = Generator(trained[0], options=GeneratorOptions(box_source=source))
        vis = gen.visual([vis_img, vis_img])
        outs = gen.generate(
            vis, ["ground", "identify"], ["right lung", "describe the findings with their boxes."], [[], []]
        )
        assert [o["source"] for o in outs] == [expect, expect]
        if source == "head":
            assert len(outs[0]["boxes"]) == 1 and outs[0]["malformed_boxes"] == 0
    gen = Generator(trained[0])
    rec = gen.generate(gen.visual([vis_img]), ["report"], ["describe the findings and impression."], [[]])[0]
    assert rec["source"] == "finding head + exemplars" and rec["text"]
    assert isinstance(rec["head_findings"], list)


def test_findings_come_from_the_ridge_by_default_and_from_the_aux_head_on_request(trained, corpus):
    from generation.data.tasks import PROMPTS, classify_target
    from generation.heads.box_head import box_features
    from generation.heads.head import predicted_findings
    from generation.writing.generate import Generator
    from retrieval.data.image_io import read_image

    root, df, idx = corpus
    assert (trained[0] / "finding_head.safetensors").exists()  # fitted at the end of training
    imgs = [read_image(root / df.iloc[i]["image_path"]) for i in range(4)]
    ridge, aux = Generator(trained[0]), Generator(trained[0], options=GeneratorOptions(finding_source="aux"))
    vis = ridge.visual(imgs)
    p_ridge, t_ridge = ridge.finding_probs(vis)
    p_aux, t_aux = aux.finding_probs(vis)
    np.testing.assert_allclose(p_ridge, ridge.finding_ridge.probs(box_features(vis)))
    np.testing.assert_allclose(p_aux, aux.vlm.finding_probs(vis).numpy())
    assert t_aux == aux.vlm.config.head_thresholds and aux.finding_ridge is None
    outs = ridge.generate(vis, ["classify"] * 4, [PROMPTS["classify"]] * 4, [[]] * 4)
    for i, o in enumerate(outs):
        assert o["source"] == "finding head"
        assert o["text"] == classify_target(predicted_findings(p_ridge[i], t_ridge))
    lm_classify = Generator(trained[0], options=GeneratorOptions(classify_source="lm"))
    lm = lm_classify.generate(vis[:1], ["classify"], [PROMPTS["classify"]], [[]])
    assert lm[0]["source"] == "lm"
    with pytest.raises(UsageError, match="finding_source"):
        GeneratorOptions(finding_source="nope")


def test_evaluation_has_every_baseline(trained, corpus):
    root, df, idx = corpus
    res = evaluate_generation(trained[0], df, idx, split="test", k=2, meteor=False, progress=False)
    assert set(res["tasks"]) == {"report", "vqa", "classify", "identify", "ground"}
    for task, conds in res["tasks"].items():
        assert list(conds) == ["constant", "training prior", "retrieval-only", "vlm k=0", "vlm k=2"], task
    # the synthetic images' classes are separable by the retrieval vectors: top-1 retrieval is exact
    assert res["tasks"]["classify"]["retrieval-only"]["micro_f1"] == pytest.approx(1.0)
    assert "bleu4" in res["tasks"]["report"]["vlm k=2"] and "acc@0.5" in res["tasks"]["identify"]["vlm k=0"]


def test_cli_generate_and_usage_errors(trained, corpus, capsys):
    from cli.main import main

    root, df, idx = corpus
    img = str(root / df.iloc[3]["image_path"])
    assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", "--task", "classify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "classify" and out["exemplars"] == []
    assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", "--task", "classify", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("[classify]")
    assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", "--device", "tpu"]) == 2  # one clear line
    assert "device" in capsys.readouterr().err.lower()
    assert main(["generate", img, "--vlm", str(trained[0]), "-k", "2"]) == 2  # retrieval without --index
    assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", "--task", "ground"]) == 2  # no --phrase
    assert main(["generate", img, "--vlm", str(root / "nope"), "-k", "0"]) == 1
    assert "not a VLM folder" in capsys.readouterr().err
    lm = ["--report-source", "generate"]
    for flag, value in (("--drafts", "0"), ("--contrast", "-1")):
        assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", *lm, flag, value]) == 2
        assert flag in capsys.readouterr().err
    for flag, value in (("--drafts", "3"), ("--contrast", "1")):  # the template writer would ignore them
        assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", flag, value]) == 2
        assert "--report-source generate" in capsys.readouterr().err
        assert main(["generate", img, "--vlm", str(trained[0]), "-k", "0", "--task", "classify", *lm, flag, value]) == 2
        capsys.readouterr()


def test_cli_eval_generation_writes_tables(trained, corpus, tmp_path, capsys):
    from cli.main import main
    from retrieval.data.manifest import write_manifest

    root, df, idx = corpus
    manifest = write_manifest(df, root / "manifest.parquet")
    out = tmp_path / "generation_synth"
    args = ["eval", "generation", "--vlm", str(trained[0]), "--manifest", str(manifest), "--index", str(idx)]
    args += ["-k", "0", "--tasks", "classify", "--out", str(out), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["tasks"]["classify"]) == ["constant", "training prior", "retrieval-only", "vlm k=0"]
    assert "| retrieval-only |" in (out.with_suffix(".md")).read_text()
    assert json.loads(out.with_suffix(".json").read_text())["split"] == "test"
    n = res["tasks"]["classify"]["constant"]["n"]
    assert res["examples_available"]["classify"] == n and "seeded sample" not in out.with_suffix(".md").read_text()
    assert main([*args, "--max-per-task", "2"]) == 0  # a sample of the split: the table says so
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["tasks"]["classify"]["constant"]["n"] == 2 and sampled["examples_available"]["classify"] == n
    assert f"### [classify] (n = 2: a seeded sample of the split's {n};" in out.with_suffix(".md").read_text()


def test_visual_token_cache_is_reused_and_matches(corpus, tmp_path):
    from generation.data.features import visual_tokens_for_rows
    from generation.model.encoders import load_encoder

    root, df, _ = corpus
    df = df.copy()
    df.attrs["root"] = str(root)
    enc = load_encoder("patch:1")
    rows = list(range(6))
    fresh, _ = visual_tokens_for_rows(df, rows, [enc], 4, progress=False)
    first, _ = visual_tokens_for_rows(df, rows[:3], [enc], 4, progress=False, cache_dir=tmp_path)
    calls = {"n": 0}
    real = enc.image_tokens

    def counting(pixels):
        calls["n"] += int(pixels.shape[0])
        return real(pixels)

    enc.image_tokens = counting
    both, _ = visual_tokens_for_rows(df, rows, [enc], 4, progress=False, cache_dir=tmp_path)
    assert calls["n"] == 3  # only the three rows not cached yet
    again, _ = visual_tokens_for_rows(df, rows, [enc], 4, progress=False, cache_dir=tmp_path)
    assert calls["n"] == 3
    for r in rows:
        assert torch.allclose(again[r].float(), fresh[r].float(), atol=1e-2)
    # another encoder (other weights) gets its own cache file
    other, _ = visual_tokens_for_rows(df, rows[:2], [load_encoder("patch:2")], 4, progress=False, cache_dir=tmp_path)
    assert not torch.allclose(other[0].float(), fresh[0].float())


def test_pretrained_lm_lora_staging_and_zero_shot_write_from_the_findings(corpus, tmp_path):
    """A pretrained LM (a tiny random Llama saved with its own BPE tokenizer): LoRA trains after the projector
    alone, and the report prompt carries the finding head's line; with 0 steps the LM is prompted zero-shot."""
    from tiny_lm import save_tiny_lm

    from generation.writing.generate import Generator

    root, df, idx = corpus
    lm = save_tiny_lm(tmp_path / "lm")
    cfg = VLMTrainConfig(
        encoders=["patch:1"], steps=6, batch_size=4, lm_path=str(lm), lora=True, lora_r=4, rag_k=1, visual_grid=4
    )
    cfg.projector_fraction = 0.5
    info = train_vlm(df, tmp_path / "lora", cfg, index_dir=idx, progress=False)
    vlm = VLM.load(tmp_path / "lora")
    assert vlm.config.lora and vlm.config.findings_in_prompt and vlm.config.image_in_prompt
    assert info["vocab_size"] == len(vlm.tok) > 300  # the LM's own BPE vocabulary, grown
    zero = train_vlm(
        df,
        tmp_path / "zero",
        VLMTrainConfig(encoders=["patch:1"], steps=0, lm_path=str(lm), rag_k=1, visual_grid=4),
        index_dir=idx,
        progress=False,
    )
    assert zero["steps"] == 0 and not (tmp_path / "zero" / "lm").exists()  # the frozen LM is not copied
    by_lm = GeneratorOptions(report_source="generate")
    gen = Generator(tmp_path / "zero", idx, retrieval_model=SynthRetrievalModel(), options=by_lm)
    assert not gen.vlm.config.image_in_prompt
    row = df.iloc[int(np.flatnonzero(df["split"] == "test")[0])]
    from retrieval.data.image_io import read_image

    rec = gen.generate(gen.visual([read_image(root / row["image_path"])]), ["report"], ["describe."], [[]])[0]
    assert rec["findings_line"].startswith("Likely findings: ") and rec["source"] == "lm"
    assert all(f.lower() in rec["findings_line"] for f in rec["head_findings"])
    gen.options = gen.options.replace(vqa_source="lm")  # closed questions answered by the LM read the same line
    vqa = gen.generate(gen.visual([read_image(root / row["image_path"])]), ["vqa"], ["is there cardiomegaly?"], [[]])
    assert vqa[0]["findings_line"] == rec["findings_line"] and vqa[0]["source"] == "lm (yes/no scored)"


def test_contrastive_decoding_runs_through_the_generator(corpus, tmp_path, monkeypatch):
    """`report_decoding(a)` hands the report's decoding a contrast processor whose contrast prompt is the same
    prompt with the line saying none; 0 is the plain decoding. (contrast.py's scores: test_contrast.py.)"""
    from tiny_lm import save_tiny_lm

    from generation.model import contrast
    from generation.writing.generate import Generator, report_decoding
    from retrieval.data.image_io import read_image
    from retrieval.errors import UsageError

    root, df, idx = corpus
    cfg = VLMTrainConfig(encoders=["patch:1"], steps=0, lm_path=str(save_tiny_lm(tmp_path / "lm")), rag_k=0)
    train_vlm(df, tmp_path / "zero", cfg, index_dir=idx, progress=False)
    seen = []
    real = contrast.ContrastLogitsProcessor.__init__

    def spy(self, lm, prompts, *args, **kw):
        seen.append(prompts)
        real(self, lm, prompts, *args, **kw)

    monkeypatch.setattr(contrast.ContrastLogitsProcessor, "__init__", spy)
    image = read_image(root / df["image_path"].iloc[0])
    for alpha in (0.0, 1.0):
        gen = Generator(
            tmp_path / "zero", options=GeneratorOptions(report_source="generate"), decoding=report_decoding(alpha)
        )
        rec = gen.generate(gen.visual([image]), ["report"], ["describe."], [[]])[0]
        assert rec["source"] == "lm" and isinstance(rec["text"], str)
        assert len(seen) == (1 if alpha else 0)
    assert "Likely findings: none." in gen.vlm.tok.decode(seen[0][0])
    with pytest.raises(UsageError, match="--contrast"):
        report_decoding(-1)
    with pytest.raises(UsageError, match="--drafts"):
        report_decoding(1.0, drafts=0)


def test_best_of_drafts_runs_through_the_generator(corpus, tmp_path, monkeypatch):
    """`report_decoding(a, drafts=3)`: every report row gets its greedy draft and two seeded samples, the text is
    the draft that draft_choice.pick_draft chose against the head's findings, the caller's random state is left
    alone, and the same call gives the same report. (The choice itself: test_draft_choice.py.)"""
    import torch
    from tiny_lm import save_tiny_lm

    from generation.writing import generate
    from generation.writing.generate import Generator, report_decoding
    from retrieval.data.image_io import read_image

    root, df, idx = corpus
    cfg = VLMTrainConfig(encoders=["patch:1"], steps=0, lm_path=str(save_tiny_lm(tmp_path / "lm")), rag_k=0)
    train_vlm(df, tmp_path / "zero", cfg, index_dir=idx, progress=False)
    calls = []

    def spy(drafts, findings):
        calls.append((list(drafts), list(findings)))
        return len(drafts) - 1, 0.25  # the last draft, so the choice shows in the text

    monkeypatch.setattr(generate, "pick_draft", spy)
    images = [read_image(root / p) for p in df["image_path"].iloc[:2]]
    gen = Generator(
        tmp_path / "zero", options=GeneratorOptions(report_source="generate"), decoding=report_decoding(1.0, 3)
    )
    visual = gen.visual(images)
    torch.manual_seed(123)
    want_next = torch.rand(3)
    torch.manual_seed(123)
    recs = gen.generate(visual, ["report"] * 2, ["describe."] * 2, [[], []])
    assert torch.equal(torch.rand(3), want_next)  # drafts sample under a forked, seeded generator
    assert len(calls) == 2 and all(len(drafts) == 3 for drafts, _ in calls)
    for rec, (drafts, findings) in zip(recs, calls, strict=True):
        assert rec["text"] == drafts[-1] and rec["draft_agreement"] == 0.25
        assert findings == rec["head_findings"]
    greedy = Generator(
        tmp_path / "zero", options=GeneratorOptions(report_source="generate"), decoding=report_decoding(1.0)
    )
    first = greedy.generate(visual, ["report"] * 2, ["describe."] * 2, [[], []])
    assert [d[0] for d, _ in calls] == [r["text"] for r in first]  # draft 1 is the greedy contrastive report
    calls.clear()
    again = gen.generate(visual, ["report"] * 2, ["describe."] * 2, [[], []])
    assert [r["text"] for r in again] == [r["text"] for r in recs]


def test_lora_projector_stage_leaves_the_lm_untouched(corpus, tmp_path):
    from tiny_lm import save_tiny_lm

    root, df, idx = corpus
    lm = save_tiny_lm(tmp_path / "lm")
    cfg = VLMTrainConfig(
        encoders=["patch:1"], steps=3, batch_size=4, lm_path=str(lm), lora=True, lora_r=4, rag_k=0, visual_grid=4
    )
    cfg.projector_fraction = 1.0  # every step in the projector stage
    train_vlm(df, tmp_path / "v", cfg, progress=False)
    vlm = VLM.load(tmp_path / "v")
    lora_b = [p for n, p in vlm.lm.named_parameters() if "lora_B" in n]
    assert lora_b and all(not p.any() for p in lora_b)  # LoRA B starts at zero and was never stepped


def test_image_controls_and_shuffled_answers(trained, corpus):
    """Blank, noise and another study's image replace the test images (and the exemplars retrieved for them); the
    finding head that reads the image beats its own answers shuffled, and answers a blank image all alike."""
    from generation.data.image_controls import derangement, prompt_derangement

    root, df, idx = corpus
    kw = dict(split="test", k=2, meteor=False, progress=False, tasks=["classify"], shuffled=True)
    kw["retrieval_model"] = SynthRetrievalModel()
    res = {c: evaluate_generation(trained[0], df, idx, image_control=c, **kw) for c in ("real", "blank", "other")}
    real = res["real"]["tasks"]["classify"]
    assert list(real) == ["constant", "training prior", "retrieval-only", "vlm k=0", "vlm k=2", "shuffled"]
    assert real["vlm k=2"]["micro_f1"] > real["shuffled"]["micro_f1"] + 0.2
    blank = res["blank"]["tasks"]["classify"]
    assert blank["vlm k=2"]["micro_f1"] < real["vlm k=2"]["micro_f1"] - 0.2
    assert len({s["output"] for s in res["blank"]["samples"]["classify"] if s["condition"] == "vlm k=2"}) == 1
    assert res["other"]["tasks"]["classify"]["vlm k=2"]["micro_f1"] < real["vlm k=2"]["micro_f1"] - 0.2
    assert res["blank"]["image_control"] == "blank"
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        p = derangement(n, rng)
        assert sorted(p) == list(range(n)) and not (p == np.arange(n)).any()
    prompts = ["right lung", "heart", "right lung", "left lung", "heart", "right lung"]
    order = prompt_derangement(prompts, rng)  # shuffled answers stay answers to the same question
    assert sorted(order) == list(range(6)) and all(prompts[o] == prompts[i] for i, o in enumerate(order))
    assert [i for i, o in enumerate(order) if i == o] == [3]  # asked of one image only: no other answer
