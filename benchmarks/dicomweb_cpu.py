"""Import and index throughput from a loopback Orthanc (DICOMweb) against the same DICOM files from disk.

    python -m benchmarks.dicomweb_cpu --n 200

Makes `n` chest-like radiographs as DICOM (tests/helpers/dicom_maker.py: 256 px, CR/DX, a third each uncompressed,
JPEG baseline and JPEG 2000), uploads them by STOW-RS to a loopback Orthanc with the DICOMweb plugin
(tests/helpers/orthanc.py), then times, in one run:
- the import: `cxr data import dicom` of the folder against `cxr data import dicomweb` (QIDO-RS + WADO-RS into a
  fresh cache) with 1 fetch worker and with 4, and a rerun on the full cache (what a resume costs);
- decoding every image (retrieval.data.image_io.read_image) from disk and from the cache;
- the model (cxr-small, the offline default) encoding the decoded images;
- `index.build.build_index` end to end from each manifest (decode + model + FAISS).
Shares are of the sequential sum import + decode + model. Needs Debian's orthanc and orthanc-dicomweb (`make
orthanc`). The machine's load is recorded: these CPUs are shared, so compare rows of one run only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from benchmarks.common import markdown_table, write_results

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"


def make_files(folder: Path, n: int, size: int) -> list[Path]:
    sys.path.insert(0, str(HELPERS))
    from dicom_maker import make_radiograph

    syntaxes = ("explicit", "jpeg", "j2k")
    return [
        make_radiograph(folder / f"{i:05d}.dcm", f"P{i % max(1, n // 3)}", f"S{i}", modality=("CR", "DX")[i % 2],
                        photometric=("MONOCHROME2", "MONOCHROME1")[(i // 2) % 2], syntax=syntaxes[i % 3], seed=i,
                        size=size, accession=f"A{i}")  # fmt: skip
        for i in range(n)
    ]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def decode_all(paths) -> tuple[list, float]:
    from retrieval.data.image_io import read_image

    return timed(lambda: [read_image(p) for p in paths])


def run(n: int, size: int, workdir: Path) -> tuple[list[dict], dict]:
    sys.path.insert(0, str(HELPERS))
    from orthanc import start_orthanc

    from index.build import BuildOptions, build_index
    from retrieval.data.importers import import_source
    from retrieval.models import load_model

    files = make_files(workdir / "dicom", n, size)
    server = start_orthanc(workdir / "orthanc")
    try:
        client = server.client()
        _, upload_s = timed(lambda: [client.store_instances([pydicom.dcmread(p) for p in files[i : i + 50]])
                                     for i in range(0, n, 50)])  # fmt: skip
        auth = {"user": server.user, "password": server.password, "progress": False}
        disk, scan_s = timed(lambda: import_source("dicom", workdir / "dicom"))
        web1, fetch1_s = timed(lambda: import_source("dicomweb", server.dicomweb_url, cache=workdir / "c1", workers=1,
                                                     **auth))  # fmt: skip
        web4, fetch4_s = timed(lambda: import_source("dicomweb", server.dicomweb_url, cache=workdir / "c4", workers=4,
                                                     **auth))  # fmt: skip
        _, cached_s = timed(lambda: import_source("dicomweb", server.dicomweb_url, cache=workdir / "c4", workers=4,
                                                  **auth))  # fmt: skip
    finally:
        server.stop(kill=True)
    assert len(disk) == len(web1) == len(web4) == n, (len(disk), len(web1), len(web4))
    images_disk, decode_disk_s = decode_all(disk["image_path"])
    _, decode_web_s = decode_all(web4["image_path"])
    model = load_model("cxr-small", device="cpu")
    model.encode_images(images_disk[:8], batch_size=8)  # warm-up
    _, model_s = timed(lambda: model.encode_images(images_disk, batch_size=32))
    opts = BuildOptions(batch_size=32, workers=2, progress=False)
    _, build_disk_s = timed(lambda: build_index(disk, model, workdir / "idx_disk", options=opts))
    _, build_web_s = timed(lambda: build_index(web4, model, workdir / "idx_web", options=opts))
    rows = []
    for source, import_s, decode_s, build_s in (
        ("disk (cxr data import dicom)", scan_s, decode_disk_s, build_disk_s),
        ("Orthanc, 1 fetch worker", fetch1_s, decode_web_s, build_web_s),
        ("Orthanc, 4 fetch workers", fetch4_s, decode_web_s, build_web_s),
        ("Orthanc, all cached (rerun)", cached_s, decode_web_s, build_web_s),
    ):
        total = import_s + decode_s + model_s
        rows.append({
            "source": source, "import_s": import_s, "import_images_per_s": n / import_s,
            "decode_s": decode_s, "model_s": model_s, "share_import": import_s / total,
            "share_decode": decode_s / total, "share_model": model_s / total,
            "build_index_s": build_s, "import_plus_build_images_per_s": n / (import_s + build_s),
        })  # fmt: skip
    facts = {"n": n, "size": size, "upload_stow_s": upload_s, "parallel_speedup": fetch1_s / fetch4_s}
    return rows, facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-dicomweb-bench-"))
    load_before = os.getloadavg()[0]
    try:
        rows, facts = run(args.n, args.size, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    facts["load_avg_1min_before"] = round(load_before, 1)
    facts["load_avg_1min_after"] = round(os.getloadavg()[0], 1)
    web1, web4 = rows[1], rows[2]
    md = (
        f"- {facts['n']} radiographs of {facts['size']} px (CR/DX, MONOCHROME1/2, a third each uncompressed, JPEG "
        f"baseline, JPEG 2000), uploaded by STOW-RS in {facts['upload_stow_s']:.1f} s to a loopback Orthanc.\n"
        f"- Parallel WADO-RS: 4 fetch workers import {web4['import_images_per_s']:.0f} images/s against "
        f"{web1['import_images_per_s']:.0f} with one at a time ({facts['parallel_speedup']:.2f}x).\n"
        f"- Load average (1 min) {facts['load_avg_1min_before']} before, {facts['load_avg_1min_after']} after: "
        "the CPUs are shared, so read the ratios within this run, not the absolute figures.\n"
        "- Shares: of import + decode + model (cxr-small on the CPU), each timed on its own; build_index_s is the "
        "index build end to end (decode in 2 workers + model + FAISS) from that manifest.\n\n"
    )
    md += markdown_table(rows)
    write_results("dicomweb_cpu", {"rows": rows, **facts}, md, f"python -m benchmarks.dicomweb_cpu --n {args.n}")
    print(md)


if __name__ == "__main__":
    main()
