"""The cost of exporting one drafted report as a DICOM Comprehensive SR (generation/writing/structured_report.py).

    python -m benchmarks.sr_export [--repeat 200]

Per report, in one process, over the same draft (3 findings, 3 boxes, 3 exemplars) on a 2500x2048 16-bit DX
source: reading the source header (no pixels), building the SR with highdicom (its checks included), writing it,
the whole `write_sr`, and STOW-RS of it to a loopback HTTP endpoint (dicomweb-client; the endpoint only reads the
body, so this is the client's cost plus one loopback round trip). The baseline in the same run: writing the same
draft as JSON, what `cxr generate --json` does. Median and p90 wall ms; results in
benchmarks/results/sr_export_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, time_calls, write_results

NAME = "sr_export_cpu"
DRAFT = {
    "text": "Moderate right pleural effusion with adjacent atelectasis. Heart size is enlarged. No pneumothorax.",
    "findings": ["Pleural Effusion", "Atelectasis", "Cardiomegaly"],
    "boxes": [
        {"label": "Pleural Effusion", "x1": 0.55, "y1": 0.6, "x2": 0.92, "y2": 0.95, "score": 0.81},
        {"label": "Atelectasis", "x1": 0.58, "y1": 0.5, "x2": 0.85, "y2": 0.7, "score": 0.55},
        {"label": "Cardiomegaly", "x1": 0.35, "y1": 0.45, "x2": 0.75, "y2": 0.8, "score": 0.77},
    ],
    "exemplars": [
        {"study_id": f"s{i}", "score": 0.9 - i / 50, "study_instance_uid": f"1.2.826.0.1.3680043.8.498.{i + 1}"}
        for i in range(3)
    ],
}


def write_source(path: Path) -> Path:
    """A 2500x2048 16-bit DX (for presentation) radiograph with patient and study attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dx, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = dx, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "BENCH", "Bench^Patient", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = (
        "20240102",
        "101010",
        "A1",
        "1",
        "",
    )
    ds.Modality, ds.Rows, ds.Columns = "DX", 2500, 2048
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (2500, 2048), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def main(argv: list[str] | None = None) -> int:
    from generation import structured_report as sr_mod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/dicom-web"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_source(tmp / "source.dcm")
        header = sr_mod.read_source(src)
        built = sr_mod.build_sr(DRAFT, header)
        out = tmp / "draft.dcm"
        steps = {
            "JSON of the draft (baseline)": lambda: (tmp / "draft.json").write_text(json.dumps(DRAFT)),
            "read the source header": lambda: sr_mod.read_source(src),
            "build the SR (highdicom)": lambda: sr_mod.build_sr(DRAFT, header),
            "write_sr (read + build + write)": lambda: sr_mod.write_sr(DRAFT, src, out),
            "STOW-RS to loopback": lambda: sr_mod.store_sr(built, url),
        }
        rows = []
        for step, fn in steps.items():
            t = time_calls(fn, args.repeat, warmup=3) * 1000
            rows.append({"step": step, "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))})
        size = out.stat().st_size
    server.shutdown()
    base = rows[0]["median_ms"]
    for r in rows:
        r["x_json"] = r["median_ms"] / base
    md = markdown_table(rows, ["step", "median_ms", "p90_ms", "x_json"])
    import highdicom

    md += (
        f"\nPer report, {args.repeat} calls each after 3 warm-up calls; the SR file is {size:,} bytes "
        f"({len(DRAFT['findings'])} findings, {len(DRAFT['boxes'])} boxes, {len(DRAFT['exemplars'])} exemplars); "
        f"highdicom {highdicom.__version__}. Wall times on a shared machine: compare the rows of one run (x_json), "
        "not runs. Most of the build is highdicom's ComprehensiveSR constructor (it deep-copies the content tree and "
        "searches it for references, cProfile). For scale: generation_demo.md records 0.01-1 s of generation per "
        "output in batched evaluation, so the export costs about as much as drafting a report.\n"
    )
    payload = {"rows": rows, "repeat": args.repeat, "sr_bytes": size, "highdicom": highdicom.__version__}
    write_results(NAME, payload, md, f"python -m benchmarks.sr_export --repeat {args.repeat}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
