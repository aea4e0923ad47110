"""Input size of cxr-small's frozen Lite0 tower: 224 px (ImageNet's) against 192 px (the demo renders at 192).

    python -m benchmarks.input_size [--sizes 224 192] [--seeds 0 1 2]

For each size, with the untrained projector (the tower is what differs), image -> image P@5:
- demo val+test images: label overlap (all queries, abnormal queries), with the pooled features;
- covid-cxr: same view (PA vs AP), TBX11K: same lesion side, as benchmarks/retrieval_quality.py measures them;
plus the tower's throughput in the same run. Writes benchmarks/results/input_size_cpu.md (+ .json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import markdown_table, write_results


def _with_size(model: Any, size: int) -> Any:
    from retrieval.models.preprocess import GreyImageTransform

    base = model.image_transform()
    tf = GreyImageTransform(size, mean=base.mean, std=base.std, interpolation=base.interpolation)
    model.image_transform = lambda: tf
    return model


def _demo_p5(feats: torch.Tensor, labels: list[set[str]]) -> tuple[float, float]:
    f = torch.nn.functional.normalize(feats, dim=1).numpy()
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :5]
    overlap = [np.mean([bool(labels[i] & labels[j]) for j in row]) for i, row in enumerate(top)]
    abnormal = [o for o, ls in zip(overlap, labels, strict=True) if ls != {"No Finding"}]
    return float(np.mean(overlap)), float(np.mean(abnormal))


def main(argv: list[str] | None = None) -> None:
    import benchmarks.retrieval_quality as rq
    from retrieval.data.demo import build_demo_corpus
    from retrieval.data.importers import import_source
    from retrieval.data.manifest import resolve_image_path
    from retrieval.models import load_model
    from retrieval.models.image_stream import encode_image_items
    from serve.demo_pipeline import DEFAULT_WORKDIR, DEMO_SIZE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 192])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = ap.parse_args(argv)

    demo = build_demo_corpus(DEFAULT_WORKDIR / "corpus", size=DEMO_SIZE, seed=0, show_progress=False)
    sub = demo[demo["split"].isin(["val", "test"])]
    paths = [str(resolve_image_path(DEFAULT_WORKDIR / "corpus", p)) for p in sub["image_path"]]
    labels = [set(x) for x in sub["labels"]]
    covid = import_source("covid-cxr", args.data / "covid-cxr")
    covid["view_key"] = covid["view"].astype(str).str.upper().str.replace(" ", "")
    covid = covid[covid["view_key"].isin(["PA", "AP"])].copy()
    covid.attrs["root"] = str(args.data / "covid-cxr")
    tb = import_source("yolo", args.data / "tbx11k-tb")
    tb["side"] = [rq._side(b) for b in tb["boxes"]]
    tb = tb[tb["side"] != "none"].copy()
    tb.attrs["root"] = str(args.data / "tbx11k-tb")

    rows = []
    for size in args.sizes:
        model = _with_size(load_model("cxr-small"), size)
        t0 = time.perf_counter()
        feats, _, _ = encode_image_items(model, paths, output="features", batch_size=64)
        rate = len(paths) / (time.perf_counter() - t0)
        demo_all, demo_abn = _demo_p5(feats, labels)
        covid_p = [
            rq._i2i_precision(_with_size(load_model("cxr-small", seed=s), size), covid, "view_key") for s in args.seeds
        ]
        tb_p = [rq._i2i_precision(_with_size(load_model("cxr-small", seed=s), size), tb, "side") for s in args.seeds]
        rows.append(
            {
                "size": size,
                "demo i2i P@5 all": round(demo_all, 3),
                "demo i2i P@5 abnormal": round(demo_abn, 3),
                "covid same view P@5": f"{np.mean(covid_p):.3f} ± {np.std(covid_p):.3f}",
                "tbx11k same side P@5": f"{np.mean(tb_p):.3f} ± {np.std(tb_p):.3f}",
                "tower images/s": round(rate, 1),
            }
        )
        print(rows[-1], flush=True)
    columns = list(rows[0])
    body = "\n".join(
        [
            markdown_table(rows, columns),
            "",
            f"Demo: {len(paths)} val+test images, pooled tower features. covid-cxr / TBX11K: the untrained "
            f"projector over the tower, seeds {args.seeds} (mean ± sd), test images querying train+val as in "
            "retrieval_quality.py. "
            "images/s: the tower on the demo images in this run (a ratio; the machine is shared).",
        ]
    )
    write_results(
        "input_size_cpu",
        {"rows": rows, "command": "python -m benchmarks.input_size"},
        body,
        "python -m benchmarks.input_size",
    )


if __name__ == "__main__":
    main()
