"""A tiny random pretrained-LM stand-in for the VLM tests, built offline: a byte-level BPE tokenizer trained on a
few sentences (with a ChatML template and `<|im_end|>` as eos, as SmolLM2 has) and a random LlamaForCausalLM,
saved as a transformers folder that `--lm FOLDER` loads."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "right pleural effusion.",
    "the heart is normal in size. the lungs are clear.",
    "there is a left lower lobe opacity. no pneumothorax.",
    "likely findings: cardiomegaly (right, 0.80).",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_lm(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A random 1-layer Llama (hidden 32) with `tiny_tokenizer`, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
