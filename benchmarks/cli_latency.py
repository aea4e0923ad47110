"""CLI latency: `cxr --help` and one `cxr query IMAGE --index IDX`, each a fresh process, wall and CPU seconds,
this checkout against another (`--before TREE`, e.g. the commit before a change), interleaved in one run, with the
floor `python -c pass` beside them.

    git worktree add /tmp/cli-before COMMIT
    python -m benchmarks.cli_latency --index IDX --image FILE --before /tmp/cli-before --rounds 7

IDX: an index whose index_info.json records its model folder (so `cxr query` needs no --model), e.g. the demo's
or one built with `BuildOptions(model_path=...)`. Each tree runs with PYTHONPATH set to it, with the same venv,
CXR_ONNX_DIR (warmed by one untimed round) and arguments. The first query after the ONNX cache is emptied (the
export of the image embedding, once per model) is timed apart. On a shared machine compare the ratios, and the
CPU seconds, which load inflates less than wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, write_results

HERE = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], tree: Path, onnx_dir: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run; a failing command is an error."""
    env = {**os.environ, "PYTHONPATH": str(tree), "CXR_ONNX_DIR": onnx_dir, "COLUMNS": "80"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {tree}: exit {proc.returncode}: {proc.stderr[-800:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--before", help="the other checkout (default: none, this tree only)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="cli_latency")
    a = p.parse_args(argv)
    py = sys.executable
    commands = {
        "python -c pass (floor)": [py, "-c", "pass"],
        "cxr --help": [py, "-m", "cli.main", "--help"],
        "cxr query IMAGE --index IDX": [py, "-m", "cli.main", "query", a.image, "--index", a.index, "-k", "5"],
    }
    trees = {"after (this tree)": HERE} | ({"before": Path(a.before).resolve()} if a.before else {})
    onnx_dir = tempfile.mkdtemp(prefix="cxr-cli-latency-onnx-")
    first = {label: timed(commands["cxr query IMAGE --index IDX"], tree, tempfile.mkdtemp()) for label, tree in
             trees.items()}  # fmt: skip  # an empty ONNX cache: the first query of a model
    for tree in trees.values():  # warm the shared cache and the page cache, untimed
        for cmd in commands.values():
            timed(cmd, tree, onnx_dir)
    samples: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(a.rounds):
        for name, cmd in commands.items():
            for label, tree in trees.items():  # interleaved: both trees see the same load
                wall, cpu = timed(cmd, tree, onnx_dir)
                samples.setdefault((name, label), []).append((wall, cpu, os.getloadavg()[0]))
    rows = []
    for (name, label), got in samples.items():
        wall, cpu, load = (np.array(x) for x in zip(*got, strict=True))
        rows.append({"command": name, "tree": label, "wall_p50_s": float(np.median(wall)), "wall_min_s":
                     float(wall.min()), "cpu_p50_s": float(np.median(cpu)), "runs": len(wall),
                     "load_1min": f"{load.min():.1f}-{load.max():.1f}"})  # fmt: skip
    for label, (wall, cpu) in first.items():
        load = f"{os.getloadavg()[0]:.1f}"
        rows.append({"command": "cxr query, first (empty ONNX cache)", "tree": label, "wall_p50_s": wall,
                     "wall_min_s": wall, "cpu_p50_s": cpu, "runs": 1, "load_1min": load})  # fmt: skip
    lines = []
    get = {(r["command"], r["tree"]): r for r in rows}
    for name in list(commands)[1:]:
        after, before = get[(name, "after (this tree)")], get.get((name, "before"))
        line = f"- `{name}`: {after['wall_p50_s']:.2f} s wall p50, {after['cpu_p50_s']:.2f} s CPU"
        if before:
            line += (f" (before: {before['wall_p50_s']:.2f} s wall, {before['cpu_p50_s']:.2f} s CPU; "
                     f"{before['wall_p50_s'] / after['wall_p50_s']:.1f}x faster in wall time, "
                     f"{before['cpu_p50_s'] / after['cpu_p50_s']:.1f}x in CPU)")  # fmt: skip
        lines.append(line + ".")
    floor = get[("python -c pass (floor)", "after (this tree)")]
    lines.append(f"- Floor: `python -c pass` {floor['wall_p50_s']:.2f} s wall in the same run.")
    md = "\n".join(lines) + "\n\n" + markdown_table(rows, list(rows[0]))
    cmd = "python -m benchmarks.cli_latency " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(a.name, {"rows": rows, "index": a.index, "rounds": a.rounds}, md, cmd)
    print(md)


if __name__ == "__main__":
    main()
