"""Self-contained model folders for offline machines: the layout, sha256 checksums, relink, export/unpack.

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
written as `text`, so relinking never invalidates it. Filling a folder from the hub is `prefetch.py`; what a
name or folder holds and whether it is whole, `model_status.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

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

# Weights of the report metrics (generation.evaluation.metrics), fetched like models.
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
def folder_files(folder: Path) -> list[str]:
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
    lines = [f"{file_digest(folder, rel)}  {rel}\n" for rel in folder_files(folder)]
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
    report.unlisted = [rel for rel in folder_files(folder) if rel not in listed]
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
        for rel in [*folder_files(folder), CHECKSUMS_FILE]:
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
