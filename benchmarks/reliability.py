"""Reliability probes of the index (issue 14): bit flips, SIGKILLs, readers during a writer, and the cost.

* Bit flips: N random single-bit flips each in images.faiss, reports.faiss and meta.parquet of Flat, HNSW and IVF
  indexes; counted as detected by `verify_index` (what `cxr index verify` runs), by the default open (full hash up
  to 256 MiB) and by the quick open used above that size (sizes, head/tail hashes, schema, structure).
* SIGKILL: `cxr index build` / `cxr index add` (the real CLI entry point, with the test encoder) and `cxr train`
  (cxr-tiny) killed at a random moment, rerun to completion, compared with an uninterrupted run (file hashes
  and meta; final weights for train), then rerun once more: it must exit 0.
* Readers: opens + searches in a loop while `cxr index add` commits generation after generation; errors counted.
* Cost: open time with and without the checks, and verify time per GB.
* Crash (`--only crash`, benchmarks/crasher.py): server and writer SIGKILLed at random, queries throughout.

Small synthetic data (tests/helpers/index_helpers.py, tests/helpers/train_manifest.py) so that it runs in minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import markdown_table, write_results
from benchmarks.crasher import CLI, HELPERS, REPO, cli_env

sys.path[:0] = [str(HELPERS), str(REPO)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(argv: list[str], delay: float = 0.0, kill_after: float | None = None) -> tuple[int, float, str]:
    """Run `cxr ARGV` with the test encoder in a new process group; SIGKILL the group after `kill_after` s."""
    script = CLI.format(tests=str(HELPERS), repo=str(REPO), argv=argv)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script], env=cli_env(delay), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if kill_after is not None:
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    return proc.returncode, time.perf_counter() - t0, out + err


def _state(index: Path) -> dict:
    """What must be identical between a resumed and an uninterrupted run."""
    from index import store

    gen = store.resolve(index).gen_dir
    meta = pd.read_parquet(gen / store.META_FILE)
    meta["labels"] = [list(x) for x in meta["labels"]]
    return {
        "images": _sha(gen / store.IMAGES_FILE),
        "reports": _sha(gen / store.REPORTS_FILE),
        "meta": hashlib.sha256(meta.to_json().encode()).hexdigest(),
        "bad": store.read_bad(index).to_json(),
    }


# ------------------------------------------------------------------------------------------------ bit flips


def bit_flips(work: Path, flips: int, seed: int) -> list[dict]:
    from reliability_helpers import flip_bit, vector_index

    from index import store, verify
    from index.search import Searcher

    rows = []
    rng = np.random.default_rng(seed)
    for factory in ("Flat", "HNSW32,Flat", "IVF64,Flat"):
        idx = vector_index(work / f"flip-{factory}", n=5000, d=64, factory=factory)
        gen = store.resolve(idx).gen_dir
        queries = np.random.default_rng(9).normal(size=(8, 64)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        truth = Searcher(idx).search_ids(queries, k=5, target="images")[1]
        for name in (store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE):
            pristine = (gen / name).read_bytes()
            counts = {"verify": 0, "open (default)": 0, "open (quick)": 0, "quick-served, answer changed": 0}
            for _ in range(flips):
                flip_bit(gen / name, rng)
                for key, fn in (
                    ("verify", lambda: verify.verify_index(idx)),
                    ("open (default)", lambda: store.open_index(idx)),
                ):
                    try:
                        fn()
                    except store.IndexError_:
                        counts[key] += 1
                try:
                    s = Searcher(store.open_index(idx, full=False))
                    ids = s.search_ids(queries, k=5, target="images" if name != store.REPORTS_FILE else "reports")[1]
                    if name == store.IMAGES_FILE and not np.array_equal(ids, truth):
                        counts["quick-served, answer changed"] += 1
                except store.IndexError_:
                    counts["open (quick)"] += 1
                (gen / name).write_bytes(pristine)
            rows.append({"factory": factory, "file": name, "size_kb": round(len(pristine) / 1024, 1),
                         "flips": flips, **{f"detected by {k}" if k != "quick-served, answer changed" else k: v
                                            for k, v in counts.items()}})  # fmt: skip
            print(rows[-1], flush=True)
    # the CLI itself on a few flips: exit 1 and one stderr line
    idx = work / "flip-Flat"
    gen = store.resolve(idx).gen_dir
    cli_ok = 0
    for name in (store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE):
        pristine = (gen / name).read_bytes()
        flip_bit(gen / name, rng)
        p = subprocess.run([sys.executable, "-m", "cli.main", "index", "verify", str(idx)], env=cli_env(),
                           capture_output=True, text=True)  # fmt: skip
        cli_ok += p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and name in p.stderr
        (gen / name).write_bytes(pristine)
    rows.append({"factory": "Flat", "file": "CLI `cxr index verify` (one flip per file)", "flips": 3,
                 "detected by verify": cli_ok})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------ SIGKILL


def kills(work: Path, n_build: int, n_add: int, n_train: int, seed: int) -> list[dict]:
    from index_helpers import make_corpus
    from reliability_helpers import unit_vectors  # noqa: F401 - keeps the helpers importable here

    from retrieval.data.manifest import read_manifest, write_manifest

    rng = np.random.default_rng(seed)
    corpus = make_corpus(work / "corpus", n=160)
    df = read_manifest(corpus)
    extra = df.iloc[:64].copy()
    extra["image_id"] = [f"x{i}" for i in range(len(extra))]
    write_manifest(extra, corpus.parent / "extra.parquet")
    rows = []
    delay = 0.05
    factories = ["Flat", "HNSW16,Flat", "IVF8,Flat"]
    for f_i, factory in enumerate(factories):
        ref = work / f"ref-{f_i}"
        build = lambda out: ["index", "build", "-m", str(corpus), "--model", "fake-0", "--out", str(out),  # noqa: E731
                             "--workers", "1", "--batch-size", "8", "--shard-rows", "16", "--factory", factory]
        add = lambda out: ["index", "add", "--index", str(out), "-m", str(corpus.parent / "extra.parquet"),  # noqa: E731
                           "--model", "fake-0", "--workers", "1", "--batch-size", "8", "--shard-rows", "16"]
        rc, t_build, log = _cli(build(ref), delay)
        assert rc == 0, log
        base = work / f"base-{f_i}"
        shutil.copytree(ref, base)
        rc, t_add, log = _cli(add(ref), delay)
        assert rc == 0, log
        want_build, want_add = None, _state(ref)
        shutil.rmtree(work / "tmp-ref", ignore_errors=True)
        shutil.copytree(base, work / "tmp-ref")
        want_build = _state(work / "tmp-ref")
        for kind, count, t_ref in (("build", n_build, t_build), ("add", n_add, t_add)):
            for k in range(count // len(factories) + (f_i < count % len(factories))):
                out = work / f"k-{kind}-{f_i}-{k}"
                if kind == "add":
                    shutil.copytree(base, out)
                argv = build(out) if kind == "build" else add(out)
                at = float(rng.uniform(0.1, 0.95) * t_ref)  # mostly mid-run; a few land after the commit point
                rc_kill, _, _ = _cli(argv, delay, kill_after=at)
                rc_resume, _, log = _cli(argv, 0.0)
                same = _state(out) == (want_build if kind == "build" else want_add)
                rc_again, _, log2 = _cli(argv, 0.0)
                leftovers = [p.name for p in out.rglob(".*.tmp")] + [p.name for p in out.glob(".build")] + [
                    p.name for p in out.glob(".add")]  # fmt: skip
                rows.append({"command": f"index {kind}", "factory": factory, "killed_at_s": round(at, 2),
                             "killed": rc_kill == -9, "resume_rc": rc_resume, "identical": same,
                             "rerun_rc": rc_again, "rerun_says_done": "nothing to do" in log2,
                             "leftovers": len(leftovers)})  # fmt: skip
                print(rows[-1], flush=True)
                shutil.rmtree(out, ignore_errors=True)
    rows += train_kills(work, n_train, rng)
    return rows


TRAIN = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from cli.main import main
sys.exit(main({argv!r}))
"""


def train_kills(work: Path, n: int, rng: np.random.Generator) -> list[dict]:
    from safetensors.torch import load_file
    from train_manifest import make_manifest

    manifest = make_manifest(work / "train-data", 40)

    def argv(out: Path) -> list[str]:
        return ["train", "--manifest", str(manifest), "--out", str(out), "--epochs", "3", "--batch-size", "16",
                "--image-tower", "frozen", "--patience", "5", "--json"]  # fmt: skip

    def run(out: Path, kill_after: float | None = None) -> tuple[int, float]:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", TRAIN.format(tests=str(HELPERS), repo=str(REPO), argv=argv(out))],
                             env=cli_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            p.wait(kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return p.returncode, time.perf_counter() - t0

    def weights(out: Path) -> str:
        files = sorted(out.glob("*.safetensors"))
        h = hashlib.sha256()
        for f in files:
            for k, v in sorted(load_file(str(f)).items()):
                h.update(k.encode() + v.numpy().tobytes())
        return h.hexdigest()

    ref = work / "train-ref"
    rc, t_ref = run(ref)
    assert rc == 0
    want = weights(ref)
    rows = []
    for k in range(n):
        out = work / f"train-k{k}"
        at = float(rng.uniform(0.3, 1.0) * t_ref)  # model loading takes the first ~30%
        rc_kill, _ = run(out, at)
        rc_resume, _ = run(out)
        same = weights(out) == want
        rc_again, _ = run(out)
        rows.append({"command": "train", "factory": "-", "killed_at_s": round(at, 2), "killed": rc_kill == -9,
                     "resume_rc": rc_resume, "identical": same, "rerun_rc": rc_again, "rerun_says_done": None,
                     "leftovers": len(list(out.rglob(".*.tmp")))})  # fmt: skip
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------------ readers


ADDER = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from pathlib import Path
from index_helpers import FakeModel
from index.build import BuildOptions, add_to_index
from retrieval.data.manifest import read_manifest, write_manifest
df = read_manifest({corpus!r})
stop = Path({stop!r})
j = 0
while not stop.exists():
    part = df.iloc[8:16].copy()
    part["image_id"] = [f"a{{j}}-{{i}}" for i in range(8)]
    p = Path({corpus!r}).parent / f"add{{j % 2}}.parquet"
    write_manifest(part, p)
    add_to_index({out!r}, p, FakeModel(), BuildOptions(batch_size=8, workers=0, shard_rows=8, progress=False))
    j += 1
print(j, flush=True)
"""


def readers(work: Path, n_reads: int) -> dict:
    from index_helpers import FakeModel, make_corpus
    from reliability_helpers import unit_vectors

    from index.build import BuildOptions, build_index
    from index.search import Searcher

    corpus = make_corpus(work / "rcorpus", n=64)
    out = work / "ridx"
    build_index(corpus, FakeModel(), out, options=BuildOptions(workers=0, progress=False))
    stop = work / "stop"
    script = ADDER.format(tests=str(HELPERS), repo=str(REPO), corpus=str(corpus), out=str(out), stop=str(stop))
    proc = subprocess.Popen([sys.executable, "-c", script], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    q = unit_vectors(1, 32)
    errors, generations = [], set()
    t0 = time.perf_counter()
    for _ in range(n_reads):
        try:
            s = Searcher(out)
            s.search_ids(q, k=5, target="images")
            generations.add(s.index.generation)
        except Exception as e:  # noqa: BLE001 - every error counts
            errors.append(f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    stop.touch()
    stdout, stderr = proc.communicate()
    return {"opens_and_searches": n_reads, "errors": len(errors), "first_errors": errors[:3],
            "generations_seen": len(generations), "adds_committed": int(stdout.strip() or 0),
            "writer_rc": proc.returncode, "seconds": round(seconds, 1)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ cost


def cost(work: Path, sizes: list[int], dim: int) -> list[dict]:
    import faiss
    from reliability_helpers import vector_index

    from benchmarks.common import time_calls
    from index import store, verify
    from retrieval.fileio import sha256_file

    rows = []
    for n in sizes:
        idx = vector_index(work / f"cost-{n}", n=n, d=dim)
        gen = store.resolve(idx).gen_dir
        nbytes = sum((gen / f).stat().st_size for f in (store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE))

        def raw():
            faiss.read_index(str(gen / store.IMAGES_FILE))
            faiss.read_index(str(gen / store.REPORTS_FILE))
            pd.read_parquet(gen / store.META_FILE)

        t = {name: float(np.median(time_calls(fn, 5))) for name, fn in (
            ("raw read (no checks)", raw),
            ("open, quick checks", lambda: store.open_index(idx, full=False)),
            ("open, full hash", lambda: store.open_index(idx, full=True)),
            ("verify", lambda: verify.verify_index(idx)),
        )}  # fmt: skip
        hashed = time_calls(lambda: [sha256_file(gen / f) for f in (store.IMAGES_FILE, store.REPORTS_FILE,
                                                                          store.META_FILE)], 5)  # fmt: skip
        rows.append({"rows": n, "dim": dim, "MB": round(nbytes / 1e6, 1), **{f"{k} ms": round(v * 1e3, 1)
                     for k, v in t.items()},
                     "quick overhead %": round(100 * (t["open, quick checks"] / t["raw read (no checks)"] - 1), 1),
                     "full overhead %": round(100 * (t["open, full hash"] / t["raw read (no checks)"] - 1), 1),
                     "verify s/GB": round(t["verify"] / (nbytes / 1e9), 2),
                     "sha256 s/GB": round(float(np.median(hashed)) / (nbytes / 1e9), 2)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips", type=int, default=200)
    ap.add_argument("--build-kills", type=int, default=9)
    ap.add_argument("--add-kills", type=int, default=6)
    ap.add_argument("--train-kills", type=int, default=6)
    ap.add_argument("--reads", type=int, default=5000)
    ap.add_argument("--cost-sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--cost-dim", type=int, default=256)
    ap.add_argument("--crash-seconds", type=float, default=180)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", default=["flips", "kills", "readers", "cost"])  # and "crash" (crasher.py)
    ap.add_argument("--name", default="reliability")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cxr-reliability-"))
    payload: dict = {}
    try:
        if "flips" in args.only:
            payload["bit_flips"] = bit_flips(work, args.flips, args.seed)
        if "kills" in args.only:
            payload["sigkill"] = kills(work, args.build_kills, args.add_kills, args.train_kills, args.seed)
        if "readers" in args.only:
            payload["readers"] = readers(work, args.reads)
        if "cost" in args.only:
            payload["cost"] = cost(work, args.cost_sizes, args.cost_dim)
        if "crash" in args.only:
            from benchmarks.crasher import crash_test

            payload["crash"] = crash_test(work, args.crash_seconds, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = []
    if "bit_flips" in payload:
        md += ["## Bit flips (single random bit per trial, file restored after each)", "",
               markdown_table(payload["bit_flips"])]  # fmt: skip
    if "sigkill" in payload:
        k = payload["sigkill"]
        ok = sum(r["killed"] or r["resume_rc"] == 0 for r in k)
        md += [f"## SIGKILL at a random moment ({len(k)} runs: {sum(r['killed'] for r in k)} killed mid-run, the "
               f"rest finished first; identical {sum(r['identical'] for r in k)}/{len(k)}, resume exit 0 "
               f"{sum(r['resume_rc'] == 0 for r in k)}/{len(k)}, rerun after completion exit 0 "
               f"{sum(r['rerun_rc'] == 0 for r in k)}/{len(k)}, {ok} ok)", "", markdown_table(k)]  # fmt: skip
    if "readers" in payload:
        md += ["## Readers during a writer", "", markdown_table([payload["readers"]])]
    if "cost" in payload:
        md += ["## Cost of the checks (median of 5; Flat, random unit vectors)", "", markdown_table(payload["cost"])]
    md += [f"## Crash test (crasher.py)\n\n{markdown_table([payload['crash']])}"] if "crash" in payload else []
    cmd = "python -m benchmarks.reliability " + " ".join(sys.argv[1:])
    json_path, md_path = write_results(args.name, payload, "\n".join(md), cmd.strip())
    print(md_path.read_text())
    print(json.dumps({"json": str(json_path), "md": str(md_path)}))


if __name__ == "__main__":
    main()
