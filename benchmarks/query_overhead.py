"""Per-query overhead of an interactive image search in process (what `cxr serve` pays per request), before/after.

    PYTHONPATH=TREE python -m benchmarks.query_overhead TREE [WORKDIR]    # WORKDIR: a `cxr demo` folder

Times `Searcher.query_vector` (search + result frame) and `Searcher.query_image` on a decoded 256 px array (the
transform, the tower through ONNX Runtime, the projector, search, frame), median of 200 / 60 calls, and prints
one JSON line. Run it from two checkouts, interleaved, to compare (benchmarks/results/query_overhead_cpu.md).
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np

from index.search import Searcher
from retrieval.models import load_model


def t(fn, n=200):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return round(float(np.median(ts)) * 1e3, 3)


def main() -> None:
    WORK = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/cxr-retrieval/demo")
    model = load_model(f"{WORK}/model")
    s = Searcher(f"{WORK}/index", model)
    q = np.random.default_rng(0).standard_normal((1, model.embed_dim)).astype(np.float32)
    q /= np.linalg.norm(q)
    arr = (np.random.default_rng(1).random((256, 256))).astype(np.float32)
    print(
        json.dumps(
            {
                "tree": sys.argv[1],
                "load": os.getloadavg()[0],
                "query_vector_ms": t(lambda: s.query_vector(q)),
                "query_image_array_ms": t(lambda: s.query_image(arr), 60),
            }
        )
    )


if __name__ == "__main__":
    main()
