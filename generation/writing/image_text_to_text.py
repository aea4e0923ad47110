"""Full pretrained VLMs through transformers' image-text-to-text classes (PaliGemma 2, Qwen2.5-VL, MedGemma), with
LoRA adapters from peft: loading, prompts with retrieved exemplars, the training loss and generation.

The base model is any `AutoModelForImageTextToText` checkpoint with its `AutoProcessor` (a hub id or a local
folder). A fine-tuned folder holds only what training changed or chose:

    hf_vlm.json   the base model's name, its model_type, box format and the LoRA settings (`HFVLMConfig`)
    adapter/      the LoRA adapter (peft `save_pretrained`: adapter_config.json + safetensors)
    processor/    the processor (tokenizer, image processor, chat template)

Prompts: the task's instruction after the exemplar reports (`Reports of similar studies: [1] ... [2] ...`), each
cut to `exemplar_tokens` tokens. Chat models (Qwen2.5-VL, MedGemma) get it as one user turn with the image through
the processor's chat template; PaliGemma (no template) gets `<image>` + the text, its processor adding `<bos>` and
the closing newline, with PaliGemma's own task prefixes (`detect X`, `answer en Q`). Boxes are in the model's own
format (`box_formats.py`). LoRA goes on the language model's linear layers only (`LORA_TARGETS`), never the
vision tower; the base weights stay frozen.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generation.data.box_formats import box_format_for, parse_model_boxes
from generation.data.rag import Exemplar, copied_sentences, indexed_study
from generation.data.tasks import PROMPTS
from generation.model.tokenizer import TASKS
from retrieval.errors import ModelLoadError, UsageError
from retrieval.labels import LABELS

log = logging.getLogger(__name__)

CONFIG_FILE = "hf_vlm.json"
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"
# The language model's attention and MLP projections (PaliGemma, Qwen2.5-VL and Gemma 3 name them alike); the
# `language_model` part keeps LoRA off the vision tower, whose blocks reuse some of these names.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MAX_NEW_TOKENS = {"report": 192, "vqa": 48, "classify": 48, "identify": 128, "ground": 64}
EXEMPLAR_HEADER = "Reports of similar studies:"
MAX_SIDE = 672  # longest image side handed to the processor: at most 24 x 24 patches of 28 px for Qwen2.5-VL


@dataclass
class HFVLMConfig:
    """What a fine-tuned folder records beside its adapter: the base model and how it was adapted."""

    base_model: str
    model_type: str
    box_format: str
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    exemplar_tokens: int = 96
    tasks: list[str] = field(default_factory=lambda: list(TASKS))

    def save(self, folder: Path) -> None:
        from retrieval.fileio import write_json_atomic

        write_json_atomic(folder / CONFIG_FILE, {"kind": "image-text-to-text", **asdict(self)})

    @classmethod
    def load(cls, folder: Path) -> HFVLMConfig:
        try:
            raw = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: unreadable ({e})") from e
        raw.pop("kind", None)
        try:
            return cls(**raw)
        except TypeError as e:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: not an image-text-to-text VLM config ({e})") from e


def is_image_text_to_text(folder: str | Path) -> bool:
    """True for a folder written by this module (it holds `hf_vlm.json`)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on CUDA (a 3-4B model then fits one GPU with LoRA), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base(name: str, device: torch.device, processor_from: str | Path | None = None) -> tuple[Any, Any]:
    """(model, processor) of an image-text-to-text checkpoint: a hub id (with the hub) or a local folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(processor_from or name))
        model = AutoModelForImageTextToText.from_pretrained(str(name), dtype=_dtype(device))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load image-text-to-text model {name!r}: {e}") from e
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"{name!r}: its processor has no tokenizer or image processor")
    return model.to(device), processor


def to_pil(image: np.ndarray | Any, max_side: int = MAX_SIDE) -> Any:
    """An HxW [0, 1] grey array (our image I/O) -> an RGB PIL image (what VLM processors take), its longest side
    at most `max_side` (aspect kept): a full-size radiograph would cost a native-resolution VLM (Qwen2.5-VL)
    thousands of image tokens. Boxes are relative, so the resize never moves them."""
    from PIL import Image

    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        arr = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


def instruction(task: str, prompt: str, box_format: str) -> str:
    """The task's instruction in the model family's own phrasing; `prompt` is the example's (`tasks.py`): the
    question for vqa, the phrase for ground, the fixed prompt otherwise."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    loc = box_format == "loc"
    if task == "ground":
        if loc:
            return f"detect {prompt}"
        return f"Locate the {prompt} in this chest X-ray and output its bbox_2d coordinates in JSON format."
    if task == "identify":
        if loc:
            return "detect findings"
        return "Locate every finding in this chest X-ray and output their bbox_2d coordinates and labels in JSON."
    if task == "vqa":
        return f"answer en {prompt}" if loc else f"Answer about this chest X-ray: {prompt}"
    return {"report": PROMPTS["report"], "classify": PROMPTS["classify"]}[task]


def exemplar_block(tokenizer: Any, exemplars: Sequence[Exemplar], max_tokens: int, sep: str = "\n") -> str:
    """`Reports of similar studies:` and `[n] report` parts, each report cut to `max_tokens` tokens, joined by `sep`
    ('' for none). PaliGemma gets `sep=" "`: a newline ends its prompt."""
    lines = []
    for rank, ex in enumerate(exemplars, start=1):
        ids = tokenizer(ex.report, add_special_tokens=False)["input_ids"][:max_tokens]
        text = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
        if text:
            lines.append(f"[{rank}] {text}")
    return sep.join([EXEMPLAR_HEADER, *lines]) + sep if lines else ""


def prompt_text(processor: Any, text: str) -> str:
    """The model's input text for one image and `text`: the chat template's user turn, or PaliGemma's `<image>`."""
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return f"{processor.image_token}{text}"


def _takes_suffix(processor: Any) -> bool:
    """PaliGemma's processor builds the answer part and its labels itself (`suffix=`)."""
    import inspect

    return "suffix" in inspect.signature(processor.__call__).parameters


def encode(processor: Any, images: Sequence[Any], prompts: Sequence[str], targets: Sequence[str] | None = None):
    """The processor's batch for `prompts` (from `prompt_text`) and their images; with `targets`, the answers
    follow (ended by EOS) and `labels` holds their ids only (prompt, image and padding tokens are -100)."""
    tok = processor.tokenizer
    images = [[im] for im in images]  # one image per prompt (a flat list is one sample's images to some processors)
    # a chat template writes every special token itself (Gemma 3's <bos>); the tokenizer must not add another
    kw = {"add_special_tokens": False} if getattr(processor, "chat_template", None) else {}
    if targets is None:
        tok.padding_side = "left"  # generation continues every row from its last token
        return processor(text=list(prompts), images=images, padding=True, return_tensors="pt", **kw)
    tok.padding_side = "right"
    if _takes_suffix(processor):
        return processor(text=list(prompts), images=images, suffix=list(targets), padding=True,
                         return_tensors="pt")  # fmt: skip
    full = [p + t + tok.eos_token for p, t in zip(prompts, targets, strict=True)]
    batch = processor(text=full, images=images, padding=True, return_tensors="pt", **kw)
    prompt_lens = [len(ids) for ids in processor(text=list(prompts), images=images, **kw)["input_ids"]]
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def seen_sizes(processor: Any, images: Sequence[Any]) -> list[tuple[int, int] | None]:
    """(width, height) of each image as the model sees it, from the processor's patch grid (Qwen-VL's
    `image_grid_thw`); None for processors with a fixed size (PaliGemma's boxes are relative anyway)."""
    ip = processor.image_processor
    patch = getattr(ip, "patch_size", None)
    if not hasattr(ip, "merge_size") or patch is None:
        return [None] * len(images)
    grid = ip(images=list(images), return_tensors="pt")["image_grid_thw"]
    return [(int(w) * patch, int(h) * patch) for _, h, w in grid.tolist()]


class ImageTextToTextVLM:
    """A base image-text-to-text model with LoRA adapters, its processor and its `HFVLMConfig`."""

    def __init__(self, model: Any, processor: Any, config: HFVLMConfig, device: torch.device):
        self.model, self.processor, self.config, self.device = model, processor, config, device

    @classmethod
    def create(cls, base: str, device: torch.device, lora_r: int = 16, lora_alpha: int = 32,
               lora_dropout: float = 0.05) -> ImageTextToTextVLM:  # fmt: skip
        """The base model with fresh, trainable LoRA adapters on its language model (base weights frozen)."""
        from peft import LoraConfig, get_peft_model

        local = Path(base).expanduser()
        name = str(local.resolve()) if local.is_dir() else base
        model, processor = load_base(name, device)
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)
        mtype = str(model.config.model_type)
        config = HFVLMConfig(name, mtype, box_format_for(mtype), lora_r, lora_alpha, lora_dropout)
        return cls(model, processor, config, device)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device, trainable: bool = False) -> ImageTextToTextVLM:
        """A fine-tuned folder: the base model named in `hf_vlm.json` with the folder's adapter and processor."""
        from peft import PeftModel

        folder = Path(folder)
        config = HFVLMConfig.load(folder)
        model, processor = load_base(config.base_model, device, processor_from=folder / PROCESSOR_DIR)
        try:
            model = PeftModel.from_pretrained(model, str(folder / ADAPTER_DIR), is_trainable=trainable)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"{folder / ADAPTER_DIR}: cannot load the LoRA adapter ({e})") from e
        model.eval()
        return cls(model.to(device), processor, config, device)

    def save(self, folder: str | Path) -> None:
        """Adapter, processor, then the config (written last and atomically: a folder without it is no VLM) into
        `folder`; the base weights are not copied."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder / ADAPTER_DIR))
        self.processor.save_pretrained(str(folder / PROCESSOR_DIR))
        self.config.save(folder)

    def prompts(self, tasks: Sequence[str], prompts: Sequence[str], exemplars: Sequence[Sequence[Exemplar]]):
        """The model's input text per example: exemplar reports, then the task's instruction."""
        tok, fmt, n = self.processor.tokenizer, self.config.box_format, self.config.exemplar_tokens
        sep = "\n" if getattr(self.processor, "chat_template", None) else " "
        return [
            prompt_text(self.processor, exemplar_block(tok, ex, n, sep) + instruction(t, p, fmt))
            for t, p, ex in zip(tasks, prompts, exemplars, strict=True)
        ]

    def _to_device(self, batch: Any) -> Any:
        """The batch on the model's device, its pixels in the model's dtype (ids stay integers)."""
        return batch.to(self.device).to(dtype=_dtype(self.device))

    def loss(self, images: Sequence[Any], texts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """Mean cross-entropy of the `targets` given the images and the `prompts` texts (answer tokens only)."""
        batch = self._to_device(encode(self.processor, [to_pil(im) for im in images], texts, targets))
        return self.model(**batch).loss

    @torch.no_grad()
    def generate(self, images: Sequence[Any], tasks: Sequence[str], prompts: Sequence[str],
                 exemplars: Sequence[Sequence[Exemplar]], max_new_tokens: int | None = None) -> list[dict]:  # fmt: skip
        """Greedy answers: {source, task, prompt, text, exemplars, copied, boxes (identify / ground / where)}."""
        pil = [to_pil(im) for im in images]
        texts = self.prompts(tasks, prompts, exemplars)
        batch = self._to_device(encode(self.processor, pil, texts))
        limit = max_new_tokens or max(MAX_NEW_TOKENS[t] for t in tasks)
        self.model.eval()
        out = self.model.generate(**batch, max_new_tokens=limit, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        sizes = seen_sizes(self.processor, pil)
        recs = []
        for i, (task, prompt, ex) in enumerate(zip(tasks, prompts, exemplars, strict=True)):
            text = self.processor.tokenizer.decode(new[i], skip_special_tokens=True).strip()
            rec = {
                "source": "image-text-to-text",
                "task": task,
                "prompt": prompt,
                "text": text,
                "exemplars": [{"ref": r, **e.to_dict(False)} for r, e in enumerate(ex, start=1)],
                "copied": copied_sentences(text, ex) if task == "report" else [],
            }
            if task in ("identify", "ground") or (task == "vqa" and prompt.startswith("where is")):
                rec["boxes"] = parse_model_boxes(self.config.box_format, text, sizes[i], LABELS)
            recs.append(rec)
        return recs


def exemplars_for_image(index_dir: str | Path, image: str | Path | np.ndarray, array: np.ndarray, k: int,
                        retrieval_model: Any = None) -> list[Exemplar]:  # fmt: skip
    """Top-k exemplar reports for one image from an index: never the image's own study or patient when the
    image file is itself in the index. `retrieval_model` defaults to the model the index records."""
    from generation.data.features import open_searcher
    from generation.data.rag import retrieve_exemplars
    searcher = open_searcher(index_dir)
    study, patient = indexed_study(searcher.index.meta, image) if isinstance(image, str | Path) else (None, None)
    model = retrieval_model or searcher.index.load_model()
    vecs = np.asarray(model.encode_images([array]), dtype=np.float32)
    return retrieve_exemplars(searcher, vecs, k, [study], [patient])[0]


def answer_image(image: str | Path | np.ndarray, vlm_dir: str | Path, task: str, prompt: str, k: int,
                 index_dir: str | Path | None = None, device: str | None = None, retrieval_model: Any = None,
                 vlm: ImageTextToTextVLM | None = None) -> dict:  # fmt: skip
    """`image_answer.generate_for_image` for a fine-tuned image-text-to-text folder: one image (path or HxW array)
    -> the answer record of `ImageTextToTextVLM.generate`, with up to k exemplar reports from `index_dir` in the
    prompt (k = 0: none; k > 0 without an index: a UsageError). Pass a loaded `vlm` to reuse it across calls."""
    from retrieval.data.image_io import read_image
    from retrieval.device import resolve_device

    if k > 0 and index_dir is None:
        raise UsageError("retrieval needs --index (or pass -k 0)")
    vlm = vlm or ImageTextToTextVLM.load(vlm_dir, resolve_device(device))
    array = read_image(image) if isinstance(image, str | Path) else np.asarray(image, dtype=np.float32)
    exemplars = exemplars_for_image(index_dir, image, array, k, retrieval_model) if k > 0 else []
    return vlm.generate([array], [task], [prompt], [exemplars])[0]
