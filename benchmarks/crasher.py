"""A crash test in the spirit of Qdrant's crasher (issue 29, deliver 8): `cxr serve` and a writer running
`cxr index add` for a few minutes, both SIGKILLed at random moments and restarted, with queries throughout.

* The writer appends parts of 8 rows (each row its own study, with a report no other row has) by running the real
  `cxr index add` in a new process group (the test encoder stands in for the model); about half the runs are
  killed at a random moment and rerun until one exits 0. A part is **acknowledged** when its command exits 0.
* The server is the real `cxr serve` (loopback, watching the folder every 0.5 s), killed every 8-20 s and
  restarted; the time from the kill to its first healthy answer is its recovery time.
* A query thread sends text searches for the report of a random row acknowledged at least 5 s earlier (the server
  picks an add up within its watch interval). An answer is **wrong** when that row is not among the top 3, or when
  any returned row's report is not the one its image_id was added with. Refused connections while the server is
  down are counted apart.
* At the end the folder must verify in full, and every acknowledged row must be in it exactly once: **acknowledged
  adds lost** counts those missing.

Run through `python -m benchmarks.reliability --only crash --crash-seconds 180`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "helpers"
CLI = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
import retrieval.models as m
from index_helpers import FakeModel
m.load_model = lambda name, device=None: FakeModel()
from cli.main import main
sys.exit(main({argv!r}))
"""
WORDS = (
    "opacity effusion nodule hilar apical basal cardiac pleural rib clavicle lobar patchy linear streaky "
    "dense faint left right upper lower mid zone margin contour shadow line tube wire clip stable new"
).split()


def cli_env(delay: float = 0.0) -> dict:
    """The environment of a `cxr` child running the test encoder (CXR_FAKE_DELAY seconds per image batch)."""
    return dict(os.environ, CXR_FAKE_DELAY=str(delay), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _spawn(argv: list[str], delay: float = 0.02, log: Path | None = None) -> subprocess.Popen:
    """`cxr ARGV` with the test encoder, in a new process group; stderr to `log` (appended) or a pipe."""
    env = cli_env(delay)
    script = CLI.format(tests=str(HELPERS), repo=str(REPO), argv=argv)
    err = open(log, "a") if log is not None else subprocess.PIPE  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Server:
    """`cxr serve` in its own process group, restarted after each kill."""

    def __init__(self, index: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.index, self.proc = index, None

    def start(self) -> None:
        argv = ["serve", "--index", str(self.index), "--model", "fake", "--no-vlm", "--port", str(self.port),
                "--watch-interval", "0.5"]  # fmt: skip
        self.proc = _spawn(argv, delay=0, log=self.index.parent / "server.log")

    def kill(self) -> None:
        _kill(self.proc)

    def post(self, body: dict, timeout: float = 10) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/search", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_healthy(self, limit: float = 120) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("the server did not come back")


def _part(corpus_rows, folder: Path, j: int, rng: random.Random) -> tuple[Path, dict]:
    """Manifest part j: 8 of the corpus's images under new ids, each its own study with a report of its own."""
    from retrieval.data.manifest import write_manifest

    part = corpus_rows.sample(8, random_state=j).copy()
    part["image_id"] = [f"c{j}-{i}" for i in range(8)]
    part["study_id"] = [f"cs{j}-{i}" for i in range(8)]
    part["patient_id"] = f"cp{j}"
    part["report"] = [f"Part {j} row {i}: " + " ".join(rng.sample(WORDS, 7)) + "." for i in range(8)]
    path = folder / f"part{j:05d}.parquet"
    write_manifest(part, path)
    return path, dict(zip(part["image_id"], part["report"], strict=True))


def _query_loop(server: Server, acked: list, truth: dict, stop: threading.Event, stats: Counter, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        ready = [a for a in list(acked) if a[0] < time.time() - 5]
        if not ready:
            time.sleep(0.2)
            continue
        _, image_id, report = rng.choice(ready)
        try:
            hits = server.post({"text": report, "k": 3})["results"]
        except (urllib.error.URLError, OSError, ValueError):
            stats["queries refused (server down)"] += 1
            time.sleep(0.05)
            continue
        stats["queries answered"] += 1
        ok = any(h["image_id"] == image_id for h in hits)
        ok &= all(truth.get(h["image_id"], h["report"]) == h["report"] for h in hits)
        stats["wrong answers"] += int(not ok)


def _server_killer(server: Server, stop: threading.Event, recovery: list, seed: int) -> None:
    rng = random.Random(seed + 1)
    while not stop.wait(rng.uniform(8, 20)):
        server.kill()
        server.start()
        recovery.append(server.wait_healthy())


def crash_test(work: Path, seconds: float, seed: int = 0) -> dict:
    """Run the crash test for `seconds`; returns its counts (see the module docstring)."""
    from index_helpers import FakeModel, make_corpus

    from index import store
    from index.build import BuildOptions, build_index
    from index.verify import verify_index
    from retrieval.data.manifest import read_manifest

    rng = random.Random(seed)
    corpus = make_corpus(work / "corpus", n=32, bad=False)
    rows = read_manifest(corpus)
    index = work / "idx"
    build_index(corpus, FakeModel(), index, BuildOptions(workers=0, progress=False))
    server = Server(index)
    server.start()
    server.wait_healthy()
    acked: list[tuple[float, str, str]] = []
    truth: dict[str, str] = {}
    stats: Counter = Counter()
    recovery: list[float] = []
    resume: list[float] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_query_loop, args=(server, acked, truth, stop, stats, seed)),
               threading.Thread(target=_server_killer, args=(server, stop, recovery, seed))]  # fmt: skip
    for t in threads:
        t.start()
    deadline, j, errors = time.time() + seconds, 0, []
    try:
        while time.time() < deadline:
            path, reports = _part(rows, corpus.parent, j, rng)
            truth.update(reports)
            argv = ["index", "add", "--index", str(index), "-m", str(path), "--model", "fake",
                    "--workers", "0", "--batch-size", "4", "--shard-rows", "4"]  # fmt: skip
            killed_at = None
            while True:
                proc = _spawn(argv)
                t0 = time.perf_counter()
                if killed_at is None and rng.random() < 0.5:
                    try:
                        proc.wait(rng.uniform(0.1, 2.5))
                    except subprocess.TimeoutExpired:
                        _kill(proc)
                        stats["writer kills"] += 1
                        killed_at = time.perf_counter()
                        continue
                _, err = proc.communicate()
                if proc.returncode == 0:
                    break
                errors.append(err.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
                if len(errors) > 20:
                    raise RuntimeError(f"the writer keeps failing: {errors[-3:]}")
            if killed_at is not None:
                resume.append(time.perf_counter() - t0)
            acked.extend((time.time(), i, r) for i, r in reports.items())
            stats["adds acknowledged"] += 1
            j += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.kill()
    verified = verify_index(index)
    held = Counter(store.open_index(index).meta["image_id"])
    ids = [a[1] for a in acked]
    return {
        "seconds": seconds,
        "adds acknowledged": stats["adds acknowledged"],
        "rows acknowledged": len(ids),
        "acknowledged rows lost": sum(held[i] == 0 for i in ids),
        "rows held twice": sum(v > 1 for v in held.values()),
        "writer kills": stats["writer kills"],
        "writer errors (non-zero exit, not killed)": len(errors),
        "server kills": len(recovery),
        "queries answered": stats["queries answered"],
        "wrong answers": stats["wrong answers"],
        "queries refused (server down)": stats["queries refused (server down)"],
        "server recovery s (median / max)": _median_max(recovery),
        "writer resume s after a kill (median / max)": _median_max(resume),
        "final verify": f"ok, {verified['rows']} rows, {verified['generation']}",
    }


def _median_max(values: list[float]) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[len(s) // 2]:.2f} / {s[-1]:.2f}"
