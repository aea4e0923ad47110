"""`VLMConfig`: what a VLM is built from, saved as `vlm_config.json` (like the retrieval `ProjectorConfig`).

Written at creation (sizes, encoders, the LM and its loss settings) and completed by the trainer (the visual grid,
prompt budget, tasks, exemplar count and the finding head's thresholds). A saved file is read back with the
defaults below for any key it lacks, so folders written before a field existed still load; keys this version does
not know are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

LOSS_NORMS = ("token", "example")
GROUP = 5  # adjacent visual tokens concatenated into one (LiteGPT / MiniGPT-v2)
DEFAULT_BUDGET = 160  # prompt tokens for the exemplars when a saved config names none


@dataclass(kw_only=True)
class VLMConfig:
    """A VLM's settings. The field order is the key order of `vlm_config.json`."""

    visual_dim: int
    group: int = GROUP
    encoders: list[dict] = field(default_factory=list)  # one {"spec", "name"} per frozen encoder
    lm_path: str | None = None  # None: a tiny Llama trained from scratch; else a `--lm` value (language_model.py)
    lora: bool = False
    lora_r: int = 8
    aux_labels: int = 0  # outputs of the auxiliary finding head (0: no head)
    coord_sigma: float = 0.0  # > 0: Gaussian coordinate targets (sigma in grid units)
    coord_init: bool = False  # coordinate-token embeddings start from Fourier features of their value
    loss_norm: str = "token"  # "token" or "example" (see `VLM.forward`)
    image_in_prompt: bool = True  # False: the LM sees no image embeddings (zero-shot: an untrained projector)
    # Set by the trainer:
    visual_grid: int | None = None
    prompt_budget: int = DEFAULT_BUDGET
    tasks: list[str] | None = None
    rag_k: int = 1
    head_thresholds: list[float] | None = None
    findings_in_prompt: bool = False  # [report] and [vqa] prompts carry the finding head's "Likely findings" line
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer version, kept as they were

    def __post_init__(self) -> None:
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"unknown loss_norm {self.loss_norm!r}; choose from {LOSS_NORMS}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `vlm_config.json` holds."""
        out = asdict(self)
        return {**{k: v for k, v in out.items() if k != "extra"}, **out["extra"]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        """A saved object -> config: missing keys take the defaults, unknown keys go to `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        if "visual_dim" not in d:
            raise ValueError("vlm_config.json has no visual_dim")
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})

    # A mapping view, for scripts written against the dict the VLM carried before (`config["tasks"]`,
    # `config.get("rag_k", 1)`, `config.update(visual_grid=4)`); the library reads the fields.
    def _known(self, key: str) -> bool:
        return key != "extra" and key in {f.name for f in fields(self)}

    def __getitem__(self, key: str) -> Any:
        if self._known(key):
            return getattr(self, key)
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if self._known(key):
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (self._known(key) or key in self.extra)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def update(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        for key, value in {**(values or {}), **more}.items():
            self[key] = value
