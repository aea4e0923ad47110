"""Radiographs as DICOM files for the tests, made with pydicom from small synthetic chest-like images.

`write_dicom(path, pixels, ...)` writes a minimal file (8-bit, float or no pixel data; any attributes): the query
images and hostile inputs of the query, serve, fuzz, reliability and SR tests; `minimal_dataset` is its dataset
before pixels. `make_radiograph(path, ...)` writes one CR or DX image (MONOCHROME1 or MONOCHROME2; uncompressed,
JPEG baseline or JPEG 2000); `make_ct`, `make_secondary_capture`, `make_report_sr` write what an importer must skip
or read as a report; `damage_header` and `write_without_preamble` spoil a file on purpose. `make_test_folder(folder)`
lays out the whole set the importer tests walk and returns what each file is expected to give (kept, or skipped and
why).

JPEG baseline is 8 bit (Pillow encodes it; pydicom encapsulates the frame); JPEG 2000 is lossless 12 bit through
pydicom's encoder (pylibjpeg-openjpeg). Every `make_*` file is deterministic for its arguments (seeded pixels,
given UIDs); `write_dicom` gives each file a fresh SOP instance UID.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SYNTAXES = ("explicit", "jpeg", "j2k")
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's own root for generated UIDs


def uid(name: str) -> str:
    """A UID derived from `name` (the same name gives the same UID)."""
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=[name])


def chest_like(seed: int, size: int = 64, bits: int = 12) -> np.ndarray:
    """A small seeded grey image with a chest's rough layout (two dark lungs, a bright mediastinum, noise), as
    unsigned integers of `bits` bits (MONOCHROME2 meaning: high = bright)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.7 - 0.25 * np.exp(-(((x - 0.3) / 0.14) ** 2 + ((y - 0.5) / 0.28) ** 2))
    img -= 0.25 * np.exp(-(((x - 0.7) / 0.14) ** 2 + ((y - 0.5) / 0.28) ** 2))
    img += 0.2 * np.exp(-(((x - 0.5) / 0.08) ** 2)) + 0.05 * rng.standard_normal((size, size))
    img += 0.1 * rng.random() * y
    top = (1 << bits) - 1
    return np.clip(np.round(img * top), 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def _base(sop_class: str, modality: str, patient_id: str, study: str, series: str, sop: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = f"Test^{patient_id}"
    ds.StudyDate = "20240101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _file_meta(ds: Dataset, syntax_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", uid("no-sop"))
    meta.TransferSyntaxUID = syntax_uid
    ds.file_meta = meta


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, syntax: str) -> None:
    """Pixel data of one grey frame in the given transfer syntax ('explicit', 'jpeg' (8 bit), 'j2k')."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelRepresentation = 0
    bits = 8 if pixels.dtype == np.uint8 else 12
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    if syntax == "explicit":
        _file_meta(ds, ExplicitVRLittleEndian)
        ds.PixelData = pixels.tobytes()
    elif syntax == "jpeg":
        from PIL import Image
        from pydicom.encaps import encapsulate

        if pixels.dtype != np.uint8:
            raise ValueError("JPEG baseline holds 8-bit pixels")
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=90)
        _file_meta(ds, JPEGBaseline8Bit)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    elif syntax == "j2k":
        _file_meta(ds, ExplicitVRLittleEndian)
        ds.compress(JPEG2000Lossless, pixels, generate_instance_uid=False)
    else:
        raise ValueError(f"unknown syntax {syntax!r} (one of {SYNTAXES})")


def minimal_dataset(sop_class: str = SecondaryCaptureImageStorage, **attrs) -> Dataset:
    """A dataset with its file meta (explicit VR little endian), `sop_class` and a fresh SOP instance UID, and
    `attrs` (e.g. Modality="DX"); no pixel attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_dicom(
    path: str | Path | io.BytesIO,
    pixels: np.ndarray | None = None,
    sop_class: str = SecondaryCaptureImageStorage,
    **attrs,
) -> str | Path | io.BytesIO:
    """A minimal DICOM file (`minimal_dataset`, Modality DX unless `attrs` say otherwise) holding `pixels` as one
    MONOCHROME2 frame: 8 bit for integers, FloatPixelData (BitsAllocated 32) for floats, or no pixel data (None).
    `attrs` are set after the pixels, so they may change any of them. `path` may be a file object."""
    ds = minimal_dataset(sop_class, Modality="DX")
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        if pixels.dtype.kind == "f":
            ds.BitsAllocated = 32
            ds.FloatPixelData = np.ascontiguousarray(pixels, dtype="<f4").tobytes()
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = pixels.astype(np.uint8).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_radiograph(
    path: str | Path,
    patient_id: str,
    study: str,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    syntax: str = "explicit",
    seed: int = 0,
    size: int = 64,
    accession: str = "",
    view: str = "PA",
    study_date: str = "20240101",
    series: str | None = None,
    sop: str | None = None,
) -> Path:
    """Write one CR or DX radiograph; UIDs derive from the study name and seed unless given. Returns the path."""
    sop_class = ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    study_uid = study if study.startswith("1.") else uid(f"study:{study}")
    ds = _base(
        sop_class,
        modality,
        patient_id,
        study_uid,
        series or uid(f"series:{study}:{modality}"),
        sop or uid(f"sop:{study}:{seed}:{modality}"),
    )
    ds.AccessionNumber = accession
    ds.StudyDate = study_date
    ds.ViewPosition = view
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    pixels = chest_like(seed, size, bits=8 if syntax == "jpeg" else 12)
    if photometric == "MONOCHROME1":
        pixels = (np.iinfo(pixels.dtype).max if syntax == "jpeg" else 4095) - pixels
        pixels = pixels.astype(np.uint8 if syntax == "jpeg" else np.uint16)
    _set_pixels(ds, pixels, photometric, syntax)
    return _save(ds, path)


def _save(ds: Dataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_ct(path: str | Path, patient_id: str, study: str, seed: int = 0) -> Path:
    """A one-slice CT image (Hounsfield rescale): an importer of radiographs must skip it."""
    ds = _base(CTImageStorage, "CT", patient_id, uid(f"study:{study}"), uid(f"series:{study}:CT"),
               uid(f"sop:{study}:{seed}:CT"))  # fmt: skip
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    _set_pixels(ds, chest_like(seed, 32), "MONOCHROME2", "explicit")
    return _save(ds, path)


def make_secondary_capture(path: str | Path, patient_id: str, study: str, seed: int = 0) -> Path:
    """A Secondary Capture (a screenshot-like image, modality OT): an importer must skip it."""
    ds = _base(SecondaryCaptureImageStorage, "OT", patient_id, uid(f"study:{study}"), uid(f"series:{study}:SC"),
               uid(f"sop:{study}:{seed}:SC"))  # fmt: skip
    ds.ConversionType = "WSD"
    _set_pixels(ds, chest_like(seed, 32, bits=8), "MONOCHROME2", "explicit")
    return _save(ds, path)


def make_report_sr(path: str | Path, patient_id: str, study: str, text: str, accession: str = "") -> Path:
    """A Basic Text SR in the radiographs' study whose content items hold the report `text` (one TEXT item per
    line, under a container)."""
    ds = _base(BasicTextSRStorage, "SR", patient_id, uid(f"study:{study}"), uid(f"series:{study}:SR"),
               uid(f"sop:{study}:SR"))  # fmt: skip
    ds.AccessionNumber = accession
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    items = []
    for line in text.splitlines():
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        name = Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
        item.ConceptNameCodeSequence = [name]
        item.TextValue = line
        items.append(item)
    ds.ContentSequence = items
    _file_meta(ds, ExplicitVRLittleEndian)
    return _save(ds, path)


def damage_header(path: str | Path) -> Path:
    """Keep the preamble and 'DICM' but replace the header with bytes no DICOM reader can parse."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:132] + b"\x02\x00\x00\x00UL\x04\x00" + b"\xff" * 16 + b"\x08\x00\x18\x00UI\xff\xff")
    return path


def write_without_preamble(src: str | Path, dst: str | Path) -> Path:
    """The dataset of `src` written with no preamble, no 'DICM' and no file meta (an old-style raw dataset)."""
    import pydicom

    ds = pydicom.dcmread(src)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(dst, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return Path(dst)


def as_archived(path: str | Path) -> Dataset:
    """A file as the dataset an archive would hold and serve (a preamble-less file gets the Part 10 preamble and
    file meta, its pixels and tags unchanged): what the tests upload by STOW-RS."""
    import pydicom

    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _file_meta(ds, ExplicitVRLittleEndian)  # write_without_preamble writes explicit VR little endian
        ds.preamble = b"\0" * 128
    return ds


@dataclass(frozen=True)
class Expected:
    """What the folder importer should make of one file: kept (with its patient and study), or skipped with a
    reason containing `reason`, or read as a report."""

    kept: bool
    patient_id: str = ""
    study: str = ""
    reason: str = ""


def make_test_folder(folder: str | Path) -> dict[str, Expected]:
    """The importer tests' folder: 8 radiographs of 4 patients across CR/DX, MONOCHROME1/2 and the three transfer
    syntaxes (one named without extension, one without preamble), a report SR, a CT, a secondary capture, a
    radiograph without StudyInstanceUID, a damaged header, a preamble-less file not named .dcm, and a text file.
    Returns {relative path: Expected}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exp: dict[str, Expected] = {}
    plan = [  # name, patient, study, modality, photometric, syntax
        ("p1/s1/pa.dcm", "P1", "S1", "DX", "MONOCHROME2", "explicit"),
        ("p1/s1/lat.dcm", "P1", "S1", "DX", "MONOCHROME1", "explicit"),
        ("p1/s2/cr.dcm", "P1", "S2", "CR", "MONOCHROME1", "j2k"),
        ("p2/s3/IM0001", "P2", "S3", "CR", "MONOCHROME2", "jpeg"),
        ("p2/s3/IM0002.dicom", "P2", "S3", "DX", "MONOCHROME1", "jpeg"),
        ("p3/s4/a.dcm", "P3", "S4", "DX", "MONOCHROME2", "j2k"),
        ("p4/s5/b.dcm", "P4", "S5", "CR", "MONOCHROME2", "explicit"),
    ]
    for i, (name, patient, study, modality, photometric, syntax) in enumerate(plan):
        make_radiograph(folder / name, patient, study, modality, photometric, syntax, seed=i,
                        accession=f"ACC-{study}", view="LL" if "lat" in name else "PA")  # fmt: skip
        exp[name] = Expected(True, patient, study)
    raw_src = make_radiograph(folder / "tmp_raw.dcm", "P4", "S5", "DX", seed=99, accession="ACC-S5")
    write_without_preamble(raw_src, folder / "p4/s5/raw.dcm")
    exp["p4/s5/raw.dcm"] = Expected(True, "P4", "S5")
    write_without_preamble(raw_src, folder / "p4/s5/raw_noname")
    exp["p4/s5/raw_noname"] = Expected(False, reason="not a DICOM file")
    raw_src.unlink()
    make_report_sr(folder / "p1/s1/report.dcm", "P1", "S1", "Heart size normal.\nNo pleural effusion.", "ACC-S1")
    exp["p1/s1/report.dcm"] = Expected(False, reason="report")
    make_ct(folder / "p5/ct.dcm", "P5", "S6")
    exp["p5/ct.dcm"] = Expected(False, reason="modality CT")
    make_secondary_capture(folder / "p5/sc.dcm", "P5", "S6")
    exp["p5/sc.dcm"] = Expected(False, reason="secondary capture")
    missing = make_radiograph(folder / "p6/nouid.dcm", "P6", "S7", seed=7)
    import pydicom

    ds = pydicom.dcmread(missing)
    del ds.StudyInstanceUID
    ds.save_as(missing, enforce_file_format=True)
    exp["p6/nouid.dcm"] = Expected(False, reason="missing StudyInstanceUID")
    damage_header(make_radiograph(folder / "p6/damaged.dcm", "P6", "S8", seed=8))
    exp["p6/damaged.dcm"] = Expected(False, reason="damaged header")
    (folder / "notes.txt").write_text("not an image\n")
    exp["notes.txt"] = Expected(False, reason="not a DICOM file")
    return exp


def from_manifest(manifest: str | Path, out: str | Path, limit: int | None = None) -> list[Path]:
    """A manifest's images (e.g. `cxr data demo`'s) as DX DICOM files (8 bit, MONOCHROME2) in `out`, one Basic
    Text SR per study holding its report: what an archive would hold for them. Returns the files written."""
    from PIL import Image

    from retrieval.data.manifest import read_manifest, resolve_image_path

    df = read_manifest(manifest)
    if limit:
        df = df.head(limit)
    out = Path(out)
    written = []
    for i, row in enumerate(df.to_dict("records")):
        grey = np.asarray(Image.open(resolve_image_path(df.attrs["root"], row["image_path"])).convert("L"))
        ds = _base(DigitalXRayImageStorageForPresentation, "DX", str(row["patient_id"]),
                   uid(f"study:{row['study_id']}"), uid(f"series:{row['study_id']}:DX"),
                   uid(f"sop:{row['image_id']}"))  # fmt: skip
        ds.AccessionNumber = f"A{i:06d}"[:16]
        ds.ViewPosition = row.get("view") or "PA"
        ds.PresentationIntentType = "FOR PRESENTATION"
        _set_pixels(ds, grey.astype(np.uint8), "MONOCHROME2", "explicit")
        written.append(_save(ds, out / f"{i:06d}.dcm"))
    for study, group in df.groupby("study_id"):
        report = str(group["report"].iloc[0] or "")
        if report:
            written.append(make_report_sr(out / f"sr-{len(written):06d}.dcm", str(group["patient_id"].iloc[0]),
                                          str(study), report))  # fmt: skip
    return written


if __name__ == "__main__":  # python tests/helpers/dicom_maker.py MANIFEST OUT [--limit N]
    import argparse

    ap = argparse.ArgumentParser(description="A manifest's images (e.g. cxr data demo's) as DICOM files + SR reports.")
    ap.add_argument("manifest", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    files = from_manifest(args.manifest, args.out, args.limit)
    print(f"wrote {len(files)} DICOM files to {args.out}")
