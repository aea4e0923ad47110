"""`cxr serve` under load on loopback: C concurrent clients for D seconds, a bounded loop that stops by itself.

    python -m benchmarks.serve_load --model cxr-tiny --gallery 20000 --clients 16 --duration 60
    python -m benchmarks.serve_load --scenarios bad --bad-fraction 0.1          # one scenario only

Scenarios (each on a freshly started server over the same index; see serve_latency for the gallery):

- `good`: every request a 1024 px JPEG upload to /search (k=5), batching on (`--max-batch 32`);
- `bad`: the same with every 10th request (`--bad-fraction 0.1`) a bad upload, cycling through: over the upload
  limit (413), a GIF (415), a truncated JPEG (422), a 10,000 x 10,000 PNG over the pixel limit (422), a DICOM
  without pixels (422). A bad request counts as an error unless it gets exactly its status; a good one unless
  it gets 200 with k results;
- `unbatched`: as `good` with `--max-batch 1` (every query its own forward pass): what batching buys.

Reported per scenario: requests, throughput, p50/p99 of good requests, errors, server RSS before the run (after
a warm-up), after it, and its peak (sampled every 0.5 s), the forward passes and mean batch size the server
counted, and the 1-minute load average before and after. Clients are asyncio tasks in this one process, so
they share the 2 cores with the server; the figures are for the whole loopback system.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, synthetic_radiographs, write_results  # noqa: E402
from benchmarks.serve_common import REPO, load_avg, rss_mib, start_server, stop_server  # noqa: E402
from benchmarks.serve_latency import WORK, random_index_for, saved_model  # noqa: E402

UPLOAD_LIMIT_MB = 1.0  # the servers here run with --max-upload-mb 1 so that the 413 payload stays small


def bad_uploads(good_jpeg: bytes) -> list[tuple[str, str, bytes, str, int]]:
    """(kind, filename, bytes, content type, expected status) for each kind of bad upload."""
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from dicom_maker import write_dicom

    rng = np.random.default_rng(1)
    oversize = b"\x89PNG\r\n\x1a\n" + rng.bytes(int(1.5 * UPLOAD_LIMIT_MB * 2**20))
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, "PNG")  # 100 M pixels, ~100 KB of file
    dcm = write_dicom(io.BytesIO())  # a DICOM without pixel data
    return [
        ("oversize", "big.png", oversize, "image/png", 413),
        ("gif", "x.gif", b"GIF89a" + rng.bytes(2000), "image/gif", 415),
        ("truncated jpeg", "cut.jpg", good_jpeg[:4000], "image/jpeg", 422),
        ("pixel bomb", "bomb.png", bomb.getvalue(), "image/png", 422),
        ("dicom without pixels", "empty.dcm", dcm.getvalue(), "application/dicom", 422),
    ]


class RSSSampler(threading.Thread):
    """Peak RSS of a process, sampled every `every` seconds until stopped."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except Exception:
                return


async def drive(
    url: str, good: list[tuple[str, bytes]], bad: list, clients: int, duration: float, bad_fraction: float, k: int = 5
) -> dict:
    """`clients` tasks post uploads until `duration` seconds have passed; every 1/bad_fraction-th is bad."""
    import httpx

    lat, stats = [], {"good": 0, "good_failed": 0, "bad": 0, "bad_wrong_status": 0, "exceptions": 0}
    by_kind: dict[str, dict] = {}
    counter = 0
    every = int(round(1 / bad_fraction)) if bad_fraction > 0 else 0
    deadline = time.perf_counter() + duration

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            i = counter
            counter += 1
            is_bad = every and i % every == every - 1
            if is_bad:
                kind, name, body, ctype, want = bad[(i // every) % len(bad)]
            else:
                name, body = good[i % len(good)]
                ctype, want = "image/jpeg", 200
            t0 = time.perf_counter()
            try:
                r = await c.post("/search", files={"image": (name, body, ctype)}, data={"k": str(k)})
                status = r.status_code
                ok = status == want and (status != 200 or len(r.json()["results"]) == k)
            except httpx.HTTPError as e:
                status, ok = f"{type(e).__name__}", False
                stats["exceptions"] += 1
            dt = time.perf_counter() - t0
            if is_bad:
                stats["bad"] += 1
                stats["bad_wrong_status"] += not ok
                rec = by_kind.setdefault(kind, {"sent": 0, "expected": want, "got": {}})
                rec["sent"] += 1
                rec["got"][str(status)] = rec["got"].get(str(status), 0) + 1
            else:
                stats["good"] += 1
                stats["good_failed"] += not ok
                if ok:
                    lat.append(dt)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {
        **stats,
        "requests": stats["good"] + stats["bad"],
        "wall_s": wall,
        "throughput_rps": (stats["good"] + stats["bad"]) / wall,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "errors": stats["good_failed"] + stats["bad_wrong_status"],
        "bad_kinds": by_kind,
    }


def scenario(name: str, index: Path, good, bad, a) -> dict:
    import httpx

    max_batch = 1 if name == "unbatched" else a.max_batch
    args = [
        "--index",
        str(index),
        "--no-vlm",
        "--watch-interval",
        "0",
        "--max-upload-mb",
        str(UPLOAD_LIMIT_MB),
        "--max-batch",
        str(max_batch),
    ]
    proc, url = start_server(args, WORK / f"serve_{name}.log")
    try:
        asyncio.run(drive(url, good, bad, a.clients, 3.0, 0.0))  # warm-up: allocator, caches, thread pools
        rss0, la0 = rss_mib(proc.pid), load_avg()
        before = httpx.get(url + "/info").json()["batching"]
        sampler = RSSSampler(proc.pid)
        sampler.start()
        duration = a.duration if name != "unbatched" else (a.compare_duration or a.duration)
        res = asyncio.run(drive(url, good, bad, a.clients, duration, a.bad_fraction if name == "bad" else 0.0))
        sampler.stop.set()
        after = httpx.get(url + "/info").json()["batching"]
        passes, jobs = after["passes"] - before["passes"], after["jobs"] - before["jobs"]
        res.update(
            scenario=name,
            clients=a.clients,
            duration_s=duration,
            max_batch=max_batch,
            rss_before_mib=rss0,
            rss_after_mib=rss_mib(proc.pid),
            rss_peak_mib=max(sampler.peak, rss0),
            forward_passes=passes,
            mean_batch=jobs / passes if passes else 0.0,
            load_avg_before=la0,
            load_avg_after=load_avg(),
            alive_after=httpx.get(url + "/health").status_code == 200,
        )
        return res
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cxr-tiny")
    p.add_argument("--index", type=Path, help="an existing index folder (its recorded model is used)")
    p.add_argument("--gallery", type=int, default=20_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--compare-duration", type=float, default=30.0, help="seconds of the unbatched scenario")
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--scenarios", nargs="+", default=["good", "bad", "unbatched"], choices=["good", "bad", "unbatched"])
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--name", default="serve_load_cpu")
    a = p.parse_args()
    from index.store import read_info

    gallery = WORK / f"index_{Path(a.model).name}_{a.gallery}"
    index = a.index or random_index_for(gallery, saved_model(a.model), a.gallery)
    info = read_info(index)
    files = synthetic_radiographs(WORK / "files", a.files, 1024, "jpg")
    good = [(Path(f).name, Path(f).read_bytes()) for f in files]
    bad = bad_uploads(good[0][1])
    rows = []
    for name in a.scenarios:
        r = scenario(name, index, good, bad, a)
        r.update(model=info["model"]["name"], rows=info["count"], factory=info["factory"])
        rows.append(r)
        print({k: v for k, v in r.items() if k != "bad_kinds"}, flush=True)
    cols = [
        "scenario",
        "model",
        "rows",
        "clients",
        "duration_s",
        "max_batch",
        "requests",
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "errors",
        "rss_before_mib",
        "rss_after_mib",
        "rss_peak_mib",
        "mean_batch",
        "load_avg_before",
        "load_avg_after",
    ]
    md = markdown_table(rows, cols)
    for r in rows:
        if r["bad_kinds"]:
            md += f"\nBad uploads in `{r['scenario']}` ({r['bad']} of {r['requests']} requests; good ones failed: "
            md += f"{r['good_failed']}):\n\n"
            md += markdown_table(
                [
                    {
                        "kind": k,
                        "sent": v["sent"],
                        "expected": v["expected"],
                        "got": ", ".join(f"{s}: {n}" for s, n in sorted(v["got"].items())),
                    }
                    for k, v in r["bad_kinds"].items()
                ]
            )
    md += (
        "\np50/p99: good requests only, wall time at the client. errors: good requests without 200 + k results, "
        "plus bad ones without exactly their 4xx. mean_batch: queries per forward pass, counted by the server.\n"
    )
    cmd = "python -m benchmarks.serve_load " + " ".join(sys.argv[1:])
    write_results(a.name, {"rows": rows}, md, cmd)
    print(md)


if __name__ == "__main__":
    main()
