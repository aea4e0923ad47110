"""The pretrained image-text-to-text path (`generation/writing/image_text_to_text.py`, `image_text_to_text_train.py`) on
tiny random PaliGemma and Qwen2.5-VL models built offline (`tiny_vlms.py`): loading through the Auto classes, prompts
with exemplars, answer-only labels, one LoRA step that moves only the adapter, save / load / generate, and the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gen_synth import SynthRetrievalModel, make_index, make_manifest, one_thread  # noqa: F401 (an autouse fixture)
from tiny_vlms import tiny_gemma3, tiny_paligemma, tiny_qwen2_5_vl

from generation.data.rag import Exemplar
from generation.data.tasks import Example
from generation.training.image_text_to_text_train import ImageTextToTextTrainConfig, optimiser, train_step
from generation.writing.image_answer import generate_for_image
from generation.writing.image_text_to_text import (
    EXEMPLAR_HEADER,
    ImageTextToTextVLM,
    encode,
    is_image_text_to_text,
    to_pil,
)
from retrieval.errors import ModelLoadError

CPU = torch.device("cpu")
BUILDERS = {"paligemma": tiny_paligemma, "qwen2_5_vl": tiny_qwen2_5_vl, "gemma3": tiny_gemma3}  # gemma3: MedGemma
EXEMPLARS = [
    Exemplar("s1", "p1", 0.9, "there is a right pleural effusion ."),
    Exemplar("s2", "p2", 0.8, "the heart is enlarged . cardiomegaly ."),
]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def base(request, tmp_path_factory):
    """(model_type, folder) of a tiny random base model saved offline."""
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    return request.param, BUILDERS[request.param](folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("itt")
    df = make_manifest(root, n=12)
    return root, df, make_index(df, root / "index")


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((40, 50)).astype(np.float32)


def test_loads_through_auto_classes_with_lora_on_the_language_model_only(base):
    mtype, folder = base
    vlm = ImageTextToTextVLM.create(str(folder), CPU, lora_r=4)
    assert vlm.config.model_type == mtype
    assert vlm.config.box_format == ("qwen-json" if mtype == "qwen2_5_vl" else "loc")
    lora = [n for n, _ in vlm.model.named_modules() if n.endswith("lora_A")]
    assert lora and all("language_model" in n for n in lora)
    # every attention and MLP projection of the language model got an adapter (2 layers x 7)
    assert len(lora) == 14
    trainable = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_a_folder_that_is_not_a_vlm_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load image-text-to-text model"):
        ImageTextToTextVLM.create(str(tmp_path), CPU)


def test_prompt_carries_exemplars_and_the_task_in_the_models_form(base):
    mtype, folder = base
    vlm = ImageTextToTextVLM.create(str(folder), CPU, lora_r=4)
    vlm.config.exemplar_tokens = 3
    texts = vlm.prompts(["report", "ground", "report"], ["describe the findings and impression.", "right lung", "x"],
                        [EXEMPLARS, EXEMPLARS, []])  # fmt: skip
    assert EXEMPLAR_HEADER in texts[0] and "[1] there is a" in texts[0] and "[2] the heart is" in texts[0]
    assert "effusion" not in texts[0]  # each exemplar cut to exemplar_tokens tokens
    assert EXEMPLAR_HEADER not in texts[2]  # k = 0: no exemplar block
    if mtype == "paligemma":  # one line: a newline ends PaliGemma's prompt
        assert texts[0].startswith("<image>") and texts[1].endswith("detect right lung") and "\n" not in texts[0]
    elif mtype == "gemma3":
        assert texts[0].startswith("<bos><start_of_turn>user\n<start_of_image>")
        assert texts[1].endswith("detect right lung<end_of_turn>\n<start_of_turn>model\n")
    else:
        assert texts[0].startswith("<|im_start|>user") and texts[0].endswith("<|im_start|>assistant\n")
        assert "bbox_2d" in texts[1]


def test_labels_cover_the_answer_and_nothing_else(base):
    _, folder = base
    vlm = ImageTextToTextVLM.create(str(folder), CPU, lora_r=4)
    texts = vlm.prompts(["report", "vqa"], ["describe the findings and impression.", "is there effusion?"],
                        [EXEMPLARS, []])  # fmt: skip
    targets = ["the heart is enlarged .", "yes"]
    batch = encode(vlm.processor, [to_pil(_image(0)), to_pil(_image(1))], texts, targets)
    tok = vlm.processor.tokenizer
    for i, target in enumerate(targets):
        answer = [t for t in batch["labels"][i].tolist() if t != -100]
        assert answer == tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = [t for t, m in zip(batch["input_ids"][i].tolist(), batch["attention_mask"][i].tolist()) if m]
        assert ids.count(tok.bos_token_id or -1) <= 1  # the chat template's <bos> is not doubled


def test_one_lora_step_moves_only_the_adapter(base):
    _, folder = base
    torch.manual_seed(0)
    vlm = ImageTextToTextVLM.create(str(folder), CPU, lora_r=4, lora_dropout=0.0)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    config = ImageTextToTextTrainConfig(str(folder), steps=1, warmup=0, lr=1e-2)
    optim, sched = optimiser(vlm, config)
    batch = [Example("report", "describe the findings and impression.", "the lungs are clear .", 0),
             Example("ground", "right lung", "", 0, {"boxes": [{"label": "right lung", "x1": 0.1, "y1": 0.2,
                                                                "x2": 0.4, "y2": 0.9}]})]  # fmt: skip
    loss = train_step(vlm, optim, sched, batch, {0: to_pil(_image())}, {0: EXEMPLARS})
    assert np.isfinite(loss) and loss > 0
    after = dict(vlm.model.named_parameters())
    base_names = [n for n in before if "lora_" not in n]
    assert base_names and all(torch.equal(before[n], after[n]) for n in base_names)
    moved = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    assert moved  # B starts at zero, so the first step changes it


def test_save_load_generate_returns_text_and_boxes(base, tmp_path):
    _, folder = base
    vlm = ImageTextToTextVLM.create(str(folder), CPU, lora_r=4)
    vlm.save(tmp_path / "ft")
    assert is_image_text_to_text(tmp_path / "ft") and not is_image_text_to_text(folder)
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    assert not list((tmp_path / "ft").rglob("model.safetensors"))  # the base weights are not copied
    loaded = ImageTextToTextVLM.load(tmp_path / "ft", CPU)
    recs = loaded.generate([_image(0), _image(1)], ["report", "ground"],
                           ["describe the findings and impression.", "right lung"], [EXEMPLARS, []],
                           max_new_tokens=6)  # fmt: skip
    assert [r["task"] for r in recs] == ["report", "ground"]
    assert all(isinstance(r["text"], str) and r["text"] for r in recs)  # random weights: some words
    assert [e["study_id"] for e in recs[0]["exemplars"]] == ["s1", "s2"] and recs[1]["exemplars"] == []
    assert isinstance(recs[1]["boxes"], list)  # whatever a random model writes parses without a crash


def test_cxr_vlm_train_base_vlm_then_cxr_generate(corpus, tmp_path, capsys):
    from cli.main import main
    from retrieval.data.manifest import write_manifest

    root, df, idx = corpus
    write_manifest(df, root / "m.parquet")
    folder = tiny_paligemma(tmp_path / "base")
    code = main(["vlm", "train", "--base-vlm", str(folder), "--manifest", str(root / "m.parquet"), "--index",
                 str(idx), "--out", str(tmp_path / "ft"), "--steps", "2", "--batch-size", "2", "--rag-k", "2",
                 "--json"])  # fmt: skip
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 2 and info["box_format"] == "loc" and info["model_type"] == "paligemma"
    assert set(info["task_sizes"]) == {"report", "vqa", "classify", "identify", "ground"}
    rec = generate_for_image(root / "img" / "0.png", idx, tmp_path / "ft", task="identify", k=2, device="cpu",
                             retrieval_model=SynthRetrievalModel())  # fmt: skip
    assert len(rec["exemplars"]) == 2 and all(e["study_id"] != "s0" for e in rec["exemplars"])  # never its own
    code = main(["generate", str(root / "img" / "1.png"), "--vlm", str(tmp_path / "ft"), "-k", "0",
                 "--task", "ground", "--phrase", "right lung", "--json", "--device", "cpu"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "image-text-to-text" and out["task"] == "ground" and "boxes" in out
    # a second run into the same folder is refused with one line, not overwritten
    code = main(["vlm", "train", "--base-vlm", str(folder), "--manifest", str(root / "m.parquet"), "--out",
                 str(tmp_path / "ft"), "--steps", "1", "--rag-k", "0"])  # fmt: skip
    assert code == 2 and "already holds a fine-tuned VLM" in capsys.readouterr().err
    code = main(["vlm", "train", "--base-vlm", str(folder), "--manifest", str(root / "m.parquet"), "--out",
                 str(tmp_path / "ft2"), "--rag-k", "0", "--resume"])  # fmt: skip
    assert code == 2 and "--resume is not supported with --base-vlm" in capsys.readouterr().err


def test_images_reach_the_processor_as_rgb_with_a_bounded_side():
    img = to_pil(np.linspace(0, 1, 2000 * 1000, dtype=np.float32).reshape(2000, 1000))
    assert img.mode == "RGB" and img.size == (336, 672)
    assert to_pil(_image()).size == (50, 40)  # small images keep their size


def test_training_targets_speak_the_models_box_format(base):
    """Boxes are trained in the model's own format: PaliGemma `<loc>` (relative), Qwen2.5-VL JSON in pixels of the
    image as its processor resized it (here 40 x 50 -> 56 x 84, multiples of 28), and read back to the same box
    within one cell."""
    from generation.data.box_formats import parse_model_boxes
    from generation.training.image_text_to_text_train import target_text
    from generation.writing.image_text_to_text import seen_sizes

    mtype, folder = base
    vlm = ImageTextToTextVLM.create(str(folder), CPU, lora_r=4)
    box = {"label": "right lung", "x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.9}
    size = seen_sizes(vlm.processor, [to_pil(_image())])[0]
    target = target_text(Example("ground", "right lung", "{<10><20><50><90>}", 0, {"boxes": [box]}),
                         vlm.config.box_format, size)  # fmt: skip
    if mtype == "qwen2_5_vl":
        assert size == (84, 56)  # (width, height)
        assert json.loads(target) == [{"bbox_2d": [8, 11, 42, 50], "label": "right lung"}]
    else:
        assert size is None and target == "<loc0205><loc0102><loc0922><loc0512> right lung"
    back = parse_model_boxes(vlm.config.box_format, target, size)[0]
    cell = 1 / 56 if size else 1 / 1024
    assert all(abs(back[k] - box[k]) <= cell for k in ("x1", "y1", "x2", "y2"))
    empty = target_text(Example("identify", "describe the findings with their boxes.", "", 0, {"boxes": []}),
                        vlm.config.box_format, size)  # fmt: skip
    assert empty == "no findings"


def test_loc_tokens_survive_the_paligemma_tokenizer(tmp_path):
    """PaliGemma's processor adds `<loc0000>`..`<loc1023>` as single tokens; what generation decodes parses back."""
    from generation.data.box_formats import format_loc, parse_loc

    vlm = ImageTextToTextVLM.create(str(tiny_paligemma(tmp_path)), CPU, lora_r=4)
    tok = vlm.processor.tokenizer
    boxes = [{"label": "cardiomegaly", "x1": 0.3, "y1": 0.45, "x2": 0.75, "y2": 0.85},
             {"label": "right lung", "x1": 0.05, "y1": 0.1, "x2": 0.45, "y2": 0.9}]  # fmt: skip
    ids = tok(format_loc(boxes), add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 + 1 + 1 + 4 + 2  # four loc tokens + label words, the ';' between
    assert parse_loc(tok.decode(ids, skip_special_tokens=True)) == parse_loc(format_loc(boxes))


def test_cxr_generate_with_a_missing_base_model_is_one_line(tmp_path, capsys):
    """A fine-tuned folder names its base model; when that is gone (or the hub is off), one line and exit 1."""
    from cli.main import main

    vlm = ImageTextToTextVLM.create(str(tiny_paligemma(tmp_path / "base")), CPU, lora_r=4)
    vlm.config.base_model = str(tmp_path / "moved-away")
    vlm.save(tmp_path / "ft")
    from PIL import Image

    Image.fromarray((_image() * 255).astype(np.uint8)).save(tmp_path / "x.png")
    code = main(["generate", str(tmp_path / "x.png"), "--vlm", str(tmp_path / "ft"), "-k", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: cannot load image-text-to-text model") and "\n" not in err
