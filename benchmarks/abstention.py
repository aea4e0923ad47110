"""How well "no close match" (index/abstain.py) separates images unlike the collection from real test radiographs.

The collection: an index of covid-cxr's train+val images (the importer's patient-disjoint splits), built as `cxr
index build` builds it, so the threshold is the one calibrated at build time. Queries, each scored by its closeness
(the index's own rule, `Searcher.matches`):
- in the collection's kind: covid-cxr's test images; TBX11K's test images (frontal films of another collection);
- unlike it: photos (the sample photographs shipped with scikit-image and matplotlib), figures (charts and diagrams
  drawn with matplotlib, scikit-image's text pages, logo and Shepp-Logan phantom), and two mishaps of real test
  films: turned 90 degrees, and inverted (a MONOCHROME1 film read without inversion);
There are no lateral films in ../shared/data, so laterals are not measured. AUROC (unlike = positive, scored by
-closeness) with 95% bootstrap intervals (retrieval/bootstrap.py), and the share of each group that passes.

Run:  .venv/bin/python -m benchmarks.abstention [--model cxr-small] [--data ../shared/data]
Writes benchmarks/results/abstention_real.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_info, markdown_table, write_results

WORK = Path("/tmp/cxr-abstention")
COMMAND = ".venv/bin/python -m benchmarks.abstention"
SKIMAGE_PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "coins", "horse", "rocket", "moon", "grass", "gravel",
                  "brick", "retina", "cell", "immunohistochemistry", "microaneurysms", "hubble_deep_field",
                  "motorcycle_left", "clock_motion"]  # fmt: skip
SKIMAGE_FIGURES = ["page", "text", "logo", "shepp_logan_phantom", "checkerboard", "binary_blobs"]


def _grey(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=-1)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def photos() -> list[tuple[str, np.ndarray]]:
    out = []
    try:
        from skimage import data as skdata

        out += [(name, _grey(getattr(skdata, name)())) for name in SKIMAGE_PHOTOS if hasattr(skdata, name)]
    except ImportError:
        pass
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        from PIL import Image

        out.append(("grace_hopper", _grey(np.asarray(Image.open(f)))))
    return out


def _chart(kind: str, seed: int) -> np.ndarray:
    """A chart as a user might paste from a paper: white page, axes, lines or bars, labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=96)
    x = np.arange(20)
    if kind == "line":
        for _ in range(3):
            ax.plot(x, np.cumsum(rng.standard_normal(20)))
    elif kind == "bar":
        ax.bar(list("ABCDEF"), rng.random(6))
    elif kind == "scatter":
        ax.scatter(rng.standard_normal(80), rng.standard_normal(80))
    elif kind == "hist":
        ax.hist(rng.standard_normal(500), bins=20)
    else:  # a box-and-arrow diagram
        ax.axis("off")
        for i, y in enumerate((0.8, 0.5, 0.2)):
            ax.text(0.5, y, f"step {i + 1}: {['import', 'encode', 'index'][i]}", ha="center", bbox={"fc": "w"})
    ax.set_title(f"Figure {seed}: {kind}")
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return _grey(img)


def figures() -> list[tuple[str, np.ndarray]]:
    out = [(f"{k}-{s}", _chart(k, s)) for s in range(2) for k in ("line", "bar", "scatter", "hist", "diagram")]
    try:
        from skimage import data as skdata

        for name in SKIMAGE_FIGURES:
            fn = getattr(skdata, name, None)
            if fn is not None:
                out.append((name, _grey(fn() if name != "binary_blobs" else fn(length=256, rng=0))))
    except ImportError:
        pass
    return out


def _scores(searcher: Any, images: list[Any]) -> np.ndarray:
    vectors = searcher.model.encode_images(images)
    return np.array([m["closeness"] for m in searcher.matches(vectors, "image")], dtype=np.float64)


def run(data: Path, model_name: str) -> dict[str, Any]:
    from index.build import BuildOptions, build_index
    from index.search import Searcher
    from index.store import INFO_FILE
    from retrieval.bootstrap import auroc_interval, interval
    from retrieval.data.image_io import read_image
    from retrieval.data.importers import import_source
    from retrieval.data.manifest import resolve_image_path
    from retrieval.models import load_model

    model = load_model(model_name)
    covid = import_source("covid-cxr", data / "covid-cxr")
    covid.attrs["root"] = str(data / "covid-cxr")
    gallery = covid[covid["split"] != "test"].copy()
    gallery.attrs["root"] = covid.attrs["root"]
    index_dir = WORK / f"idx-{model_name.replace(':', '_').replace('/', '_')}"
    t0 = time.perf_counter()
    if not (index_dir / INFO_FILE).exists():
        build_index(gallery, model, index_dir, BuildOptions(progress=False, workers=0))
    build_s = time.perf_counter() - t0
    searcher = Searcher(index_dir, model)
    record = searcher.index.info["abstain"]["image"]

    def paths(df, root) -> list[str]:
        return [str(resolve_image_path(root, p)) for p in df["image_path"]]

    covid_test = paths(covid[covid["split"] == "test"], covid.attrs["root"])
    tb = import_source("yolo", data / "tbx11k-tb")
    tb_test = paths(tb[tb["split"] == "test"], str(data / "tbx11k-tb"))
    films = [read_image(p) for p in covid_test]
    groups: dict[str, list[Any]] = {
        "covid-cxr test (in)": covid_test,
        "TBX11K test (frontal, another collection)": tb_test,
        "photos": [a for _, a in photos()],
        "figures": [a for _, a in figures()],
        "test films turned 90 degrees": [np.rot90(a).copy() for a in films],
        "test films inverted": [1.0 - a for a in films],
    }
    scores = {name: _scores(searcher, items) for name, items in groups.items()}
    inside = scores["covid-cxr test (in)"]
    rows = {}
    for name, s in scores.items():
        passes = interval((s >= record["threshold"]).astype(float))
        row = {"n": len(s), "passes": passes.record(), "median closeness": float(np.median(s))}
        if name != "covid-cxr test (in)":
            row["AUROC vs covid-cxr test"] = auroc_interval(-s, -inside).record()
        rows[name] = row
    unlike = np.concatenate([scores["photos"], scores["figures"]])
    headline = auroc_interval(-unlike, -inside)
    return {"model": model_name, "threshold": record, "index_rows": searcher.index.count, "build_s": round(build_s, 1),
            "groups": rows, "AUROC photos+figures vs covid-cxr test": headline.record()}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    from retrieval.bootstrap import Estimate

    def est(rec: dict) -> str:
        return Estimate(**rec).text(3) if rec else "-"

    th = result["threshold"]
    lines = [
        "# No close match: separating images unlike the collection (real data)",
        "",
        f"Model `{result['model']}`; index: covid-cxr train+val, {result['index_rows']} images, built as `cxr index "
        f"build` builds it. Threshold calibrated at build: closeness {th['threshold']:.4f} ({th['how']}; "
        f"{th['queries']} held-out queries, median {th['median']:.4f}).",
        "",
        f"**AUROC, photos + figures vs covid-cxr test images: {est(result['AUROC photos+figures vs covid-cxr test'])}**"
        " (95% bootstrap interval).",
        "",
    ]
    rows = []
    for name, r in result["groups"].items():
        rows.append({"queries": name, "n": r["n"], "share passing (95% CI)": est(r["passes"]),
                     "median closeness": f"{r['median closeness']:.4f}",
                     "AUROC vs covid-cxr test": est(r.get("AUROC vs covid-cxr test", {}))})  # fmt: skip
    lines.append(markdown_table(rows))
    lines += [
        "",
        "Passing = closeness at or above the threshold (the query gets results; below it, `no close match`). "
        "AUROC: the group scored by -closeness against the covid-cxr test images; 0.5 = no separation. There are no "
        "lateral films in ../shared/data, so laterals are not measured here. Photos: scikit-image's and "
        "matplotlib's sample photographs; figures: matplotlib charts and diagrams drawn here, scikit-image's text "
        "pages, logo, Shepp-Logan phantom, checkerboard and blobs.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cxr-small")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run(a.data, a.model)
    result["machine"] = machine_info()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_results("abstention_real", result, markdown(result), f"{COMMAND} --model {a.model}")


if __name__ == "__main__":
    main()
