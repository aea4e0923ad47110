"""Fill a self-contained model folder (`bundle.py`'s layout) from the hub or from installed packages:
`prefetch(name, to)`, and the report metrics' weights (CheXbert, RadGraph)."""

from __future__ import annotations

import json
import os
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from retrieval.errors import ModelLoadError
from retrieval.fileio import write_json_atomic
from retrieval.models.bundle import (
    BUNDLE_FILE,
    CHEXBERT_BERT,
    CHEXBERT_BERT_REPO,
    CHEXBERT_FILE,
    OC_CONFIG,
    OPEN_CLIP_FILES,
    RADGRAPH_BERT_DIR,
    RADGRAPH_MODEL,
    RRG_SCORERS,
    TEXT_DIR,
    TEXT_TOWER_FILES,
    TOKENIZER_FILES,
    copy_tokenizer_to_root,
    relink,
    write_checksums,
)


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
