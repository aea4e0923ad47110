"""Tiny random image-text-to-text models of the real classes (PaliGemma, Qwen2.5-VL, Gemma 3 = MedGemma's), built
offline: a WordLevel tokenizer from a word list (wrapped as a PreTrainedTokenizerFast), the family's image processor
and processor, saved as a folder that `AutoModelForImageTextToText` / `AutoProcessor` load back. A few layers, hidden
size 32-64."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the heart is enlarged normal lungs are clear there a right left pleural effusion cardiomegaly no findings "
    "and impression describe which diagnoses present yes none what abnormality seen where lung detect answer en "
    "reports of similar studies locate in this chest x ray output its bbox_2d label coordinates json format every "
    "finding their labels about user assistant"
).split()
PUNCT = list("0123456789[]{}\":,.;?-_")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
# Qwen's chat template, cut down to one user turn with images and text.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(specials: list[str], add_bos: bool = False, **kwargs):
    """A whole-word tokenizer over WORDS + digits and punctuation (one token each), specials first; `add_bos`:
    every encoding starts with `<bos>` (as Gemma's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, "<unk>", *WORDS, *PUNCT]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **kwargs)


def tiny_paligemma(folder: Path) -> Path:
    """PaliGemmaForConditionalGeneration (SigLIP 1 layer, Gemma 2 layers, hidden 32) + its processor at `folder`;
    the processor adds `<image>` and PaliGemma's `<loc0000>`..`<loc1023>` and `<seg000>`.. tokens."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = word_tokenizer(["<pad>", "<eos>", "<bos>"], pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    images = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)
    proc = PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    n = len(proc.tokenizer)
    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": n},
        image_token_index=proc.image_token_id, vocab_size=n, projection_dim=32, hidden_size=32,
    )  # fmt: skip
    PaliGemmaForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def tiny_qwen2_5_vl(folder: Path) -> Path:
    """Qwen2_5_VLForConditionalGeneration (vision 2 blocks hidden 32, text 2 layers hidden 64) + its processor,
    with a chat template; images resized to about 56 x 56 pixels (multiples of 28: 4-6 tokens after the merge)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = word_tokenizer(QWEN_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                         additional_special_tokens=QWEN_SPECIALS)  # fmt: skip
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 56},
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": len(tok), "bos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]  # fmt: skip
# Gemma 3's chat template, cut down: <bos>, then turns; an image is <start_of_image> (the processor expands it).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_gemma3(folder: Path) -> Path:
    """Gemma3ForConditionalGeneration, MedGemma's class (SigLIP 1 layer, Gemma 3 text 2 layers, hidden 32, 4 image
    tokens) + its processor with a chat template; the tokenizer adds <bos> as Gemma's does."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tok = word_tokenizer(GEMMA3_SPECIALS, add_bos=True, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})  # fmt: skip
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                           chat_template=GEMMA3_TEMPLATE, image_seq_length=4)  # fmt: skip
    config = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 16, "vocab_size": len(tok), "sliding_window": 16,
                     "pad_token_id": ids["<pad>"], "eos_token_id": ids["<eos>"], "bos_token_id": ids["<bos>"]},
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )  # fmt: skip
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
