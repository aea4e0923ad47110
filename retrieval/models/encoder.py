"""CXRModel: open_clip image + text towers, projector heads, and the one encode API (sentence-transformers style).

Pieces the trainer uses one by one (so frozen tower features can be cached):
  pixels --image_features--> (B, D_img) --project_images--> (B, E) unit vectors --abnormal_logit--> (B,)
  texts --tokenize--> ids --text_features--> (B, D_txt) --project_texts--> (B, E) unit vectors
`encode_images` / `encode_texts` chain them for users and return float32 numpy.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from copy import deepcopy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.device import autocast, resolve_device, resolve_precision
from retrieval.fileio import write_json_atomic
from retrieval.models import feature_store, onnx_tower, text_features, tower_parts
from retrieval.models.preprocess import GreyImageTransform
from retrieval.models.projector import ProjectorHeads
from retrieval.models.saved_model import PROJECTOR_FILE, TOWERS_FILE, fingerprint_state, save_safetensors
from retrieval.models.towers import pad_token_id
from retrieval.models.vision_towers import VISION_DIR


class CXRModel(nn.Module):
    """Image and text towers (open_clip) + projector heads; see docs/ARCHITECTURE.md "Models"."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        projector: ProjectorHeads,
        *,
        name: str,
        model_cfg: dict,
        trains_image_tower: bool = False,
        description: str = "",
    ):
        super().__init__()
        self.clip = clip
        self.projector = projector
        self.tokenizer = tokenizer
        self.name = name
        self.model_cfg = model_cfg
        self.trains_image_tower = trains_image_tower  # True: the image tower is trained from scratch (cxr-tiny)
        self.description = description
        self.source_dir: Path | None = None  # the saved folder it was loaded from (for its text-feature store)
        self._stores: dict[str, tuple[tuple, dict]] = {}  # feature-store file -> (its key, the store read)
        self.cnn_tower = tower_parts.cnn_trunk(clip.visual) is not None
        if self.cnn_tower:
            clip.visual.to(memory_format=torch.channels_last)

    # ---- facts -------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.projector.cfg.embed_dim)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocess config of the image tower (size, mean, std, interpolation)."""
        return dict(self.clip.visual.preprocess_cfg)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def fingerprint(self) -> str:
        """sha256 of all weights (towers + projector heads); recomputed on every access, so it follows training."""
        return fingerprint_state(self.state_dict())

    def towers(self) -> dict[str, nn.Module]:
        """{"image": image tower, "text": text tower} (open_clip modules, projector heads excluded)."""
        return {"image": self.clip.visual, "text": self.clip.text}

    # ---- building blocks ---------------------------------------------------------------------------------
    def image_transform(self) -> GreyImageTransform:
        """Picklable HxW float [0,1] array -> (3, S, S) tensor: longest side to S, pad, grey x3, mean/std."""
        cfg = self.preprocess_cfg
        interpolation = cfg.get("interpolation", "bilinear")
        if interpolation not in ("bilinear", "bicubic", "nearest", "area"):
            interpolation = "bilinear"
        return GreyImageTransform(
            self.image_size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.25,) * 3), interpolation
        )

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Token ids (B, L), truncated to the context length; trailing all-padding columns dropped (HF towers)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenizer([str(t) for t in texts])
        pad = pad_token_id(self.tokenizer)
        if pad is not None and tokens.numel():
            used = (tokens != pad).any(dim=0).nonzero()
            width = int(used.max()) + 1 if used.numel() else 1
            tokens = tokens[:, :width].contiguous()
        return tokens

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D_img): the image tower's pooled output (before the projector)."""
        if not self.cnn_tower:
            return self.clip.encode_image(pixels)
        fast = onnx_tower.run(self.clip.visual, pixels, "features")  # None unless frozen inference on the CPU
        return fast if fast is not None else self.clip.encode_image(tower_parts.channels_last(pixels))

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D_txt): the text tower's pooled output (before the projector)."""
        return self.clip.encode_text(tokens)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D_tok) for the VLM: a CNN tower's last feature map as a grid of tokens, else the
        last-block patch tokens after the final norm (no class token)."""
        named_tokens = getattr(self.clip.visual, "tokens", None)  # a tower by name (vision_towers.py)
        if self.cnn_tower:
            fmap = onnx_tower.run(self.clip.visual, pixels, "fmap")
            if fmap is not None:
                return fmap.flatten(2).transpose(1, 2)
            return tower_parts.cnn_grid_tokens(self.clip.visual, pixels)
        if named_tokens is not None:
            return named_tokens(pixels)
        out = self.clip.visual.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][-1]

    def project_images(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D_img) -> (B, embed_dim), L2-normalised float32."""
        return self.projector.image(feats)

    def project_texts(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D_txt) -> (B, embed_dim), L2-normalised float32."""
        return self.projector.text(feats)

    def abnormal_logit(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) embeddings -> (B,) abnormality logits (BCE; abnormal = any label but No Finding)."""
        return self.projector.abnormal_logit(emb)

    def forward(self, pixels: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> dict:
        """Embeddings (and image abnormality logits) for whichever inputs are given."""
        out: dict[str, torch.Tensor] = {}
        if pixels is not None:
            out["image_emb"] = self.project_images(self.image_features(pixels))
            out["abnormal_logit"] = self.abnormal_logit(out["image_emb"])
        if tokens is not None:
            out["text_emb"] = self.project_texts(self.text_features(tokens))
        return out

    # ---- freezing ----------------------------------------------------------------------------------------
    def freeze_towers(self) -> None:
        """Freeze the whole open_clip model (both towers); the projector heads stay trainable."""
        self.clip.requires_grad_(False)
        self.projector.requires_grad_(True)

    def unfreeze_last(self, n_blocks: int, towers: Sequence[str] = ("image", "text")) -> dict[str, int]:
        """Freeze the towers, then unfreeze the last `n_blocks` blocks of each named tower plus its head (final
        norm, pooling, projection); the stem (patch/token embeddings) stays frozen. Returns blocks per tower."""
        if n_blocks < 0:
            raise ValueError("n_blocks must be >= 0")
        self.freeze_towers()
        return {kind: tower_parts.unfreeze_last(self.towers()[kind], n_blocks) for kind in towers}

    # ---- encode API --------------------------------------------------------------------------------------
    def _prepare(self, device: str | torch.device | None, precision: str) -> torch.device:
        resolve_precision(precision, self.device)  # validates
        if device is not None:
            dev = resolve_device(device)
            if dev != self.device:
                self.to(dev)
        return self.device

    def encode_images(
        self,
        images: Sequence[Any] | torch.Tensor,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        precision: str = "auto",
        show_progress_bar: bool = False,
        num_workers: int = 0,
    ) -> np.ndarray:
        """Embed images -> float32 C-contiguous (N, embed_dim) L2-normalised array, in input order.

        `images`: file paths (read by retrieval.data.image_io.read_image), HxW float [0,1] arrays, or
        preprocessed (3, S, S) tensors (a (N, 3, S, S) tensor works too); a single image is accepted. `device`
        moves the model there (as sentence-transformers does; None keeps its device). `num_workers > 0` decodes and
        preprocesses in DataLoader worker processes. A bad image raises ImageReadError naming it. This is
        `image_stream.stream_images`, the one image path every caller shares."""
        from retrieval.models.image_stream import encode_image_items

        if isinstance(images, (str, Path)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2):
            images = [images]  # one image
        elif isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        self._prepare(device, precision)
        vecs, _, _ = encode_image_items(
            self,
            list(images),
            output="embeddings",
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            on_error="raise",
            progress="encoding images" if show_progress_bar else None,
        )
        return vecs

    @torch.no_grad()
    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        device: str | torch.device | None = None,
        precision: str = "auto",
        show_progress_bar: bool = False,
    ) -> np.ndarray:
        """Embed report texts -> float32 C-contiguous (N, embed_dim) L2-normalised array, in input order.

        Each distinct text runs through the tower once, in batches of similar length; texts found in the saved
        model's text-feature store (see text_features.py) skip the tower."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [str(t) for t in texts]
        dev = self._prepare(device, precision)
        precision = resolve_precision(precision, dev)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:

            def featurize(chunk: list[str]) -> torch.Tensor:
                with autocast(dev, precision):
                    return self.text_features(self.tokenize(chunk).to(dev))

            pooled = text_features.pooled_features(
                featurize,
                texts,
                batch_size,
                known=self._known_text_features(precision) if len(texts) > 1 else None,
                show_progress=show_progress_bar,
                desc="encoding texts",
            )
            out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
            for s in range(0, len(texts), 4096):
                with autocast(dev, precision):
                    emb = self.project_texts(pooled[s : s + 4096].to(dev))
                out[s : s + len(emb)] = emb.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def _known_text_features(self, precision: str) -> dict[bytes, torch.Tensor]:
        """The saved folder's stored text features, when they match this text tower and precision."""
        if precision != text_features.STORE_PRECISION:
            return {}
        return self._store(feature_store.TEXT_STORE, "text", precision)

    def stored_image_features(self, items: Sequence[Any], precision: str) -> dict[int, torch.Tensor]:
        """{position: pooled image-tower feature} for the file paths among `items` that the saved folder's image
        store holds for this image tower and precision (the image path skips the tower for them)."""
        positions = [i for i, item in enumerate(items) if isinstance(item, (str, Path)) and str(item)]
        if not positions:
            return {}
        known = self._store(feature_store.IMAGE_STORE, "image", precision)
        if not known:
            return {}
        digests = feature_store.file_digests([items[i] for i in positions])
        found = {i: known.get(d.tobytes()) for i, d in zip(positions, digests, strict=True)}
        return {i: f for i, f in found.items() if f is not None}

    def _store(self, file: str, tower: str, precision: str) -> dict[bytes, torch.Tensor]:
        """A feature store of the saved folder, read once per (file, tower weights, precision): batch callers (an
        index build, shard by shard) pay one weights hash per call, not one file read."""
        if self.source_dir is None or not (self.source_dir / file).is_file():
            return {}
        key = (str(self.source_dir / file), fingerprint_state(self.towers()[tower].state_dict()), precision)
        cached = self._stores.get(file)
        if cached is None or cached[0] != key:
            cached = (key, feature_store.load_store(self.source_dir / file, key[1], precision))
            self._stores[file] = cached
        return cached[1]

    # ---- saving ------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write the self-describing folder `load_model(out_dir)` reloads offline (see saved_model.py for the layout).

        Files are written atomically one by one, `model_info.json` and then `checksums.sha256` last, into `out_dir`
        (other files there are kept). An HF text tower is named by the folder's own `text/` path, so plain open_clip
        loads the folder as `local-dir:DIR` offline (bundle.py).
        """
        import open_clip
        import transformers

        import retrieval
        from retrieval.models import bundle

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf_config = getattr(self.clip.text, "config", None)
        model_cfg = deepcopy(self.model_cfg)
        if hf_config is not None:  # plain open_clip reads `local-dir:` text towers by this name: the folder's copy
            own = str((out / bundle.TEXT_DIR).resolve())
            model_cfg["text_cfg"].update(hf_model_name=own, hf_tokenizer_name=own)
        write_json_atomic(out / bundle.OC_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": self.preprocess_cfg})
        save_safetensors(self.clip, out / TOWERS_FILE)
        write_json_atomic(out / "projector.json", self.projector.cfg.to_dict())
        save_safetensors(self.projector, out / PROJECTOR_FILE)
        if hasattr(self.clip.visual, "save_config"):  # a tower by name: its architecture, to rebuild it offline
            self.clip.visual.save_config(out / VISION_DIR)
        if hf_config is not None:  # HF text tower: its architecture config + tokenizer, so reloading is offline
            (out / "text").mkdir(exist_ok=True)
            hf_config.save_pretrained(out / "text")
            inner = getattr(self.tokenizer, "tokenizer", None)
            if inner is not None:
                inner.save_pretrained(out / "text")
                bundle.copy_tokenizer_to_root(out)  # plain open_clip's get_tokenizer("local-dir:") reads the root
        info = {
            "name": self.name,
            "description": self.description,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "context_length": self.context_length,
            "trains_image_tower": self.trains_image_tower,
            "fingerprint": self.fingerprint,
            "fingerprint_method": "sha256 over sorted (name, dtype, shape, bytes) of every weight tensor",
            "files": [TOWERS_FILE, PROJECTOR_FILE],
            "versions": {
                "cxr-retrieval": getattr(retrieval, "__version__", "unknown"),
                "torch": torch.__version__,
                "open_clip": open_clip.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(out / "model_info.json", info)
        bundle.write_checksums(out)  # last: `cxr models verify` checks every file above against it
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}"
