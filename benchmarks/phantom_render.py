"""How fast the demo phantom renders (`render_phantom` at the demo's 192 px), and that a speed-up kept every byte.

    python -m benchmarks.phantom_render [--baseline-tree DIR] [--studies 150] [--size 192] [--rounds 3]

Each measurement runs in a fresh process (one core, `OMP_NUM_THREADS=1`, as each of the demo's render workers
does) over the same spread of IU reports (every 20th report with text). With `--baseline-tree` (a checkout of
another commit, e.g. `git worktree add /tmp/before <commit>`) the two trees run in turns, round after round, so
a change in the machine's load hits both alike; the best round of each counts. CPU time per image is the
figure to compare on a shared machine (wall time is also recorded). `digest` is a sha256 over every render's
image bytes, boxes and unrendered names: equal digests mean byte-identical output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results

NAME = "phantom_render_cpu"


def _worker(studies: int, size: int) -> dict:
    """Render the studies once (after a warm-up of 10) in this process; works on older trees too."""
    from retrieval.data.demo import study_seed
    from retrieval.data.phantom import render_phantom

    try:
        from retrieval.data.importers.iu_xray import read_iu_reports
    except ImportError:  # trees before the IU reader moved into the importer
        from retrieval.data.demo import read_iu_reports
    texts = [(" ".join(x for x in (r["findings"], r["impression"]) if x), r["study_id"]) for r in read_iu_reports()]
    texts = [t for t in texts if t[0].strip()][::20][:studies]
    for text, sid in texts[:10]:
        render_phantom(text, size=size, seed=study_seed(0, sid))
    total = hashlib.sha256()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for text, sid in texts:
        ph = render_phantom(text, size=size, seed=study_seed(0, sid))
        total.update(ph.image.tobytes())
        total.update(json.dumps([ph.boxes, ph.unrendered], sort_keys=True).encode())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = len(texts)
    return {"studies": n, "cpu_ms": 1000 * cpu / n, "wall_ms": 1000 * wall / n, "digest": total.hexdigest()}


def _run(tree: Path, studies: int, size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--studies", str(studies), "--size", str(size)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.phantom_render", description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-tree", type=Path, default=None, help="a checkout to compare against")
    ap.add_argument("--studies", type=int, default=150)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.studies, args.size)))
        return 0
    trees = {"this tree": Path(__file__).resolve().parent.parent}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append({**_run(tree, args.studies, args.size), "load_avg_1min": round(os.getloadavg()[0], 1)})
    rows = []
    for name, tree in trees.items():
        best = min(runs[name], key=lambda r: r["cpu_ms"])
        rows.append({"tree": name, "path": str(tree), **best, "digest": best["digest"][:16]})
    same = len({r["digest"] for rs in runs.values() for r in rs}) == 1
    md = markdown_table(rows, ["tree", "studies", "cpu_ms", "wall_ms", "load_avg_1min", "digest"])
    md += f"\nms per image at {args.size} px, best of {args.rounds} rounds by CPU time; "
    md += f"byte-identical output across all runs: {'yes' if same else 'NO'}\n"
    command = "python -m benchmarks.phantom_render " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(NAME, {"rows": rows, "runs": runs, "identical": same, "size": args.size}, md, command.strip())
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
