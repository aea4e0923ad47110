"""The multi-task VLM (seed 001, LiteGPT shape): frozen visual encoder(s) -> patch tokens concatenated along
features -> every five adjacent tokens concatenated -> Linear-GELU-Linear projector -> a causal LM, with the
image wrapped in `<image> ... </image>` embeddings.

The frozen visual encoders and their tokens are `encoders.py`; the settings are a `VLMConfig`
(`vlm_config.py`); padding a batch and placing the image in it is `collate.py`.

The LM is the tiny Llama trained from scratch on the MiniLM vocabulary (`lm_path` None or `tiny`), or a
pretrained causal LM by name (`language_model.resolve_lm`: `smollm2-135m`, a GGUF, a folder, a hub id) with its
own tokenizer, grown by the VLM's tokens. A pretrained LM's own weights stay frozen: the projector learns to
speak to it, and with `lora` peft adds LoRA on every linear layer and makes the new token rows trainable.

A saved VLM is a folder: `vlm_config.json`, `tokenizer/`, `lm/` (the tiny LM's `save_pretrained`, safetensors;
a peft adapter for a pretrained LM with LoRA; nothing for a frozen pretrained LM, rebuilt from `lm_path`),
`projector.safetensors`, `encoders/<i>/` (each frozen encoder's own folder).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generation.model.collate import IGNORE, collate, splice_image
from generation.model.encoders import load_encoder
from generation.model.language_model import add_vlm_tokens, load_lm
from generation.model.tokenizer import (
    COORD_TOKENS,
    EXTRA_TOKENS,
    IMAGE_END,
    IMAGE_START,
    build_tokenizer,
    end_id,
    load_tokenizer,
)
from generation.model.vlm_config import GROUP, VLMConfig
from retrieval.errors import ModelLoadError
from retrieval.fileio import write_json_atomic

__all__ = ["VLM", "VLMConfig", "group_tokens", "init_coordinate_embeddings", "load_encoder"]  # load_encoder: train.py
TINY = "tiny"  # `lm_path` of the tiny Llama trained from scratch (as None)
TINY_LM = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}
COORD_FREQUENCIES = 8  # Fourier features of a coordinate's value in the initial coordinate-token embeddings


def group_tokens(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """(B, N, D) -> (B, ceil(N/group), group*D): `group` adjacent tokens concatenated (zero-padded)."""
    b, n, d = x.shape
    pad = (-n) % group
    if pad:
        x = torch.cat([x, x.new_zeros(b, pad, d)], dim=1)
    return x.reshape(b, (n + pad) // group, group * d)


# --------------------------------------------------------------------------------------------- the VLM
def _tiny_lm(vocab_size: int, tok, overrides: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**TINY_LM, **(overrides or {})}
    config = LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=cfg["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        **cfg,
    )
    return LlamaForCausalLM(config)


class VLM(nn.Module):
    """Projector + causal LM. Inputs are visual tokens (already combined across encoders) and token ids."""

    def __init__(self, tok, lm: nn.Module, config: VLMConfig | dict):
        super().__init__()
        self.tok = tok
        self.lm = lm
        self.config = config if isinstance(config, VLMConfig) else VLMConfig.from_dict(config)
        hidden = lm.get_input_embeddings().weight.shape[1]
        visual_dim = self.config.visual_dim
        self.projector = nn.Sequential(nn.Linear(GROUP * visual_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # Auxiliary finding head on the mean projected visual token (training only): a multi-label BCE that makes
        # the projector carry the findings within a few hundred CPU steps, before the LM learns to read them.
        n_aux = int(self.config.aux_labels)
        self.aux_head = nn.Linear(hidden, n_aux) if n_aux else None
        self.img_start = tok.convert_tokens_to_ids(IMAGE_START)
        self.img_end = tok.convert_tokens_to_ids(IMAGE_END)
        self.coord_ids = torch.tensor([tok.convert_tokens_to_ids(t) for t in COORD_TOKENS])

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        visual_dim: int,
        encoders: list[dict],
        lm_path: str | None = None,
        lora: bool = False,
        lora_r: int = 8,
        lm_overrides: dict | None = None,
        seed: int = 0,
        corpus: Sequence[str] | None = None,
        aux_labels: int = 0,
        coord_sigma: float = 0.0,
        coord_init: bool = False,
        loss_norm: str = "token",
    ) -> VLM:
        """A fresh VLM: tiny Llama from scratch on the MiniLM vocabulary (pruned to `corpus`'s pieces when
        given) when `lm_path` is None or `tiny`, else a pretrained causal LM by name with its own tokenizer
        (`pretrained_lm`), + LoRA when `lora`.

        `coord_init`: the coordinate tokens start from smooth Fourier features of their value (neighbouring
        coordinates start close; see `init_coordinate_embeddings`). `coord_sigma` > 0: a coordinate target is a
        Gaussian over the grid (sigma in grid units) instead of one token, so "off by one" costs little.
        `loss_norm`: `token` (mean over every answer token of the batch: long reports dominate) or `example` (each
        example's mean, then the batch mean: every task weighs by its examples, not its answer length)."""
        lm_path = None if lm_path in (None, TINY) else str(lm_path)
        config = VLMConfig(
            visual_dim=visual_dim,
            group=GROUP,
            encoders=encoders,
            lm_path=lm_path,
            lora=bool(lora and lm_path is not None),
            lora_r=lora_r,
            aux_labels=int(aux_labels),
            coord_sigma=float(coord_sigma),
            coord_init=bool(coord_init and lm_path is None),
            loss_norm=loss_norm,
        )
        torch.manual_seed(seed)
        if lm_path is None:
            tok = build_tokenizer(corpus=corpus)
            lm = _tiny_lm(len(tok), tok, lm_overrides)
            if coord_init:
                init_coordinate_embeddings(lm.get_input_embeddings().weight, tok, seed)
        else:
            lm, tok, new_ids = pretrained_lm(lm_path)
            if config.lora:
                lm = _wrap_lora(lm, lora_r, new_ids)
        return cls(tok, lm, config)

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # -- sequence building -------------------------------------------------------------------------
    def _image_embeds(self, visual: torch.Tensor) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()
        v = self.projector(group_tokens(visual.to(self.device, torch.float32)))
        ids = torch.tensor([self.img_start, self.img_end], device=self.device)
        se = emb(ids)
        b = v.shape[0]
        return torch.cat([se[0].expand(b, 1, -1), v, se[1].expand(b, 1, -1)], dim=1)

    @torch.no_grad()
    def finding_probs(self, visual: torch.Tensor) -> torch.Tensor | None:
        """(B, n_labels) sigmoid of the auxiliary finding head on the mean projected visual token (None without
        a head)."""
        if self.aux_head is None:
            return None
        img = self._image_embeds(visual)
        return torch.sigmoid(self.aux_head(img[:, 1:-1].mean(dim=1))).float()

    def forward(
        self,
        visual: torch.Tensor,
        prompts: Sequence[list[int]],
        targets: Sequence[list[int]],
        label_targets: torch.Tensor | None = None,
        aux_weight: float = 1.0,
    ):
        """Teacher-forced loss on the answer tokens only (image and prompt positions are masked out), plus
        `aux_weight` x the auxiliary finding BCE when `label_targets` (B, n_labels) are given."""
        img = self._image_embeds(visual)
        aux = None
        if label_targets is not None and self.aux_head is not None:
            logits_aux = self.aux_head(img[:, 1:-1].mean(dim=1))
            aux = F.binary_cross_entropy_with_logits(logits_aux, label_targets.to(self.device, torch.float32))
        logits, target, row = self._answer_logits(img, prompts, targets, end=True)
        per_token = self._token_losses(logits.float(), target)
        if self.config.loss_norm == "example":
            b = len(prompts)
            per_row = torch.zeros(b, device=self.device).index_add_(0, row, per_token)
            loss = (per_row / torch.bincount(row, minlength=b).clamp(min=1)).mean()
        else:
            loss = per_token.mean()
        return loss if aux is None else loss + aux_weight * aux

    def _answer_logits(
        self, img: torch.Tensor, prompts: Sequence[list[int]], targets: Sequence[list[int]], end: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits at the answer positions only, their target ids and each one's row: the image
        embeddings `img`, the prompt, then the answer (+ the end token when `end`)."""
        img = img if self.config.image_in_prompt else img[:, :0]
        batch = collate(prompts, targets, img.shape[1], self.tok.pad_token_id, end_id(self.tok) if end else None)
        text = self.lm.get_input_embeddings()(batch.ids.to(self.device))
        embeds = splice_image(img, text, batch.image_at)
        mask = batch.attention_mask.to(self.device)
        # The vocabulary projection is the costliest layer on a CPU: apply it only where there is a label.
        hidden = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        shift = batch.labels.to(self.device)[:, 1:]
        keep = shift != IGNORE
        row = torch.arange(len(prompts), device=self.device)[:, None].expand_as(shift)[keep]
        return self.lm.get_output_embeddings()(hidden[:, :-1][keep]), shift[keep], row

    @torch.no_grad()
    def answer_log_likelihood(
        self, visual: torch.Tensor, prompts: Sequence[list[int]], answers: Sequence[list[int]]
    ) -> torch.Tensor:
        """(B,) summed log-probability the LM gives each row's answer token ids after its image and prompt
        (teacher forcing, no end token): how the LM itself scores a closed set of answers."""
        logits, target, row = self._answer_logits(self._image_embeds(visual), prompts, answers, end=False)
        logp = -F.cross_entropy(logits.float(), target, reduction="none")
        return torch.zeros(len(prompts), device=self.device).index_add_(0, row, logp).cpu()

    def _token_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy; with `coord_sigma` > 0 a coordinate token's target is a Gaussian over the
        coordinate tokens centred on the true value."""
        loss = F.cross_entropy(logits, target, reduction="none")
        sigma = float(self.config.coord_sigma)
        coord = self.coord_ids.to(target.device)
        is_coord = (target >= coord[0]) & (target <= coord[-1])
        if sigma > 0 and bool(is_coord.any()):
            value = (target[is_coord] - coord[0]).float()
            grid = torch.arange(len(coord), device=target.device, dtype=torch.float32)
            soft = torch.softmax(-((grid[None] - value[:, None]) ** 2) / (2 * sigma**2), dim=-1)
            logp = F.log_softmax(logits[is_coord], dim=-1)[:, coord]
            loss = loss.clone()
            loss[is_coord] = -(soft * logp).sum(-1)
        return loss

    @torch.no_grad()
    def generate(
        self, visual: torch.Tensor, prompts: Sequence[list[int]], max_new_tokens: int = 96, **decoding: Any
    ) -> list[list[int]]:
        """transformers `generate` on left-padded embeddings; returns the new token ids.

        `decoding` goes to `generate` as is (transformers' own controls: `num_beams`, `no_repeat_ngram_size`,
        `repetition_penalty`, ...); without it decoding is greedy. The penalties see only generated tokens
        (the prompt enters as embeddings), so copying from an exemplar is not penalised.
        """
        img = self._image_embeds(visual)
        img = img if self.config.image_in_prompt else img[:, :0]  # zero-shot: the LM reads the heads' text only
        pad, eos = self.tok.pad_token_id, end_id(self.tok)
        batch = collate(prompts, None, img.shape[1], pad, eos)  # [pad ... pad] [image] [prompt]
        text = self.lm.get_input_embeddings()(batch.ids.to(self.device))
        with warnings.catch_warnings():  # the prompt is embeddings on purpose: penalties see generated tokens only
            warnings.filterwarnings("ignore", message=".*only to newly generated tokens.*")
            out = self.lm.generate(
                inputs_embeds=splice_image(img, text, batch.image_at),
                attention_mask=batch.attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                **{"do_sample": False, "num_beams": 1, **decoding},
                eos_token_id=eos,
                pad_token_id=pad,
            )
        result = []
        for row in out.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            result.append([t for t in row if t != pad])
        return result

    # -- persistence -------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, encoders: Sequence[Any] | None = None) -> None:
        """Write the folder (see the module docstring); `encoders` are saved beside it when given."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(out / "tokenizer"))
        if self.config.lm_path is None or self.config.lora:  # a frozen pretrained LM is rebuilt from lm_path
            self.lm.save_pretrained(str(out / "lm"), safe_serialization=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
            str(out / "projector.safetensors"),
        )
        if self.aux_head is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.aux_head.state_dict().items()},
                str(out / "aux_head.safetensors"),
            )
        if encoders is not None:
            for i, enc in enumerate(encoders):
                enc.save(out / "encoders" / str(i))
        write_json_atomic(out / "vlm_config.json", self.config.to_dict())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, trainable: bool = False) -> VLM:
        """Reload a saved folder offline (`trainable`: LoRA adapters stay trainable, to resume training);
        missing or mismatched weights raise ModelLoadError."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / "vlm_config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{path}: not a VLM folder (no vlm_config.json)")
        try:
            config = VLMConfig.from_dict(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{cfg_path}: not a VLM config: {e}") from e
        tok = load_tokenizer(path / "tokenizer")
        try:
            if config.lm_path is None:
                lm = _load_causal_lm(path / "lm")
            else:
                lm, own_tok, _ = pretrained_lm(config.lm_path)
                if len(own_tok) != len(tok):
                    raise ModelLoadError(f"{path}: {len(tok)} tokens saved, {config.lm_path} grows to {len(own_tok)}")
                if config.lora:
                    from peft import PeftModel

                    lm = PeftModel.from_pretrained(lm, str(path / "lm"), is_trainable=trainable)
            vlm = cls(tok, lm, config)
            vlm.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
            if vlm.aux_head is not None:
                vlm.aux_head.load_state_dict(load_file(str(path / "aux_head.safetensors")))
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot load VLM weights: {e}") from e
        vlm = vlm.to(device or "cpu")
        return vlm.train() if trainable else vlm.eval()

    def load_encoders(self, path: str | Path, device: str | torch.device | None = None) -> list[Any]:
        """The frozen visual encoders saved inside the VLM folder at `path`."""
        out = []
        for i, _ in enumerate(self.config.encoders):
            d = Path(path) / "encoders" / str(i)
            if not d.is_dir():
                raise ModelLoadError(f"{path}: encoder folder encoders/{i} is missing")
            out.append(load_encoder(str(d), device=device))
        return out


def init_coordinate_embeddings(weight: torch.Tensor, tok, seed: int = 0) -> None:
    """Set the coordinate tokens' rows of `weight` (tied input/output embeddings) to Fourier features of their
    value through a random projection, scaled like the other rows.

    A coordinate token is otherwise a free row, so the LM must learn 101 unrelated classes from a few thousand
    boxes; here `<40>` starts close to `<41>`, and since the output layer is the same matrix, the logits over the
    grid start as a smooth function of the value (a peak can move by gradient instead of being learnt per token).
    """
    ids = torch.tensor([tok.convert_tokens_to_ids(t) for t in COORD_TOKENS])
    value = torch.linspace(0, 1, len(ids))[:, None]
    freq = torch.arange(1, COORD_FREQUENCIES + 1, dtype=torch.float32)[None] * torch.pi
    feats = torch.cat([torch.cos(value * freq), torch.sin(value * freq)], dim=1)  # (101, 2F)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(feats.shape[1], weight.shape[1], generator=gen)
    rows = feats @ proj
    with torch.no_grad():
        scale = weight.std() / rows.std().clamp(min=1e-8)
        weight[ids] = (rows * scale).to(weight.dtype)


def _load_causal_lm(path: str | Path):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: language model folder not found")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load causal LM: {e}") from e


def pretrained_lm(lm_path: str):
    """(frozen LM, its tokenizer grown by the VLM's tokens, the new token ids) for a `--lm` value."""
    lm, tok = load_lm(lm_path)
    new_ids = add_vlm_tokens(tok, lm, EXTRA_TOKENS)
    tok.model_max_length = 100_000
    lm.requires_grad_(False)
    return lm, tok, new_ids


def _wrap_lora(lm, r: int, new_ids: Sequence[int]):
    """LoRA on every linear layer (the output layer excepted); the new token rows stay trainable (peft's
    `trainable_token_indices`, which keeps a tied output layer tied), every other pretrained weight frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.05,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": list(new_ids)} if new_ids else None,
    )
    return get_peft_model(lm, config)
