"""Property-based fuzzing (hypothesis) of the three places hostile input enters: the image reader, the manifest
reader + validator, and the index open path.

Invariants: only the project's error types escape (ImageReadError, ManifestError, IndexError_), nothing hangs
over 5 s, nothing crashes the process, and a damaged index is never served. CI runs a few hundred examples per
property (profile "ci"); `make fuzz` runs HYPOTHESIS_PROFILE=fuzz (thousands). A crash found becomes an
`@example` below.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from dicom_maker import minimal_dataset
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_helpers import float_dicom, vector_index

from index import store, verify
from index.search import Searcher
from retrieval.data.image_io import read_image
from retrieval.data.manifest import read_manifest
from retrieval.data.manifest_check import check_manifest, validate_manifest
from retrieval.errors import CXRError, ImageReadError, IndexError_, ManifestError

faiss.omp_set_num_threads(1)
_common = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=150, **_common)
settings.register_profile("fuzz", max_examples=3000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
HANG_S = 5


@contextmanager
def no_hang(seconds: int = HANG_S):
    """Fail (instead of waiting forever) when the body runs over `seconds`."""

    def boom(*_):
        raise TimeoutError(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="cxr-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _read_or_refuse(path: Path) -> None:
    """read_image either gives a finite float32 HxW array in [0, 1] or raises ImageReadError naming the file."""
    with no_hang():
        try:
            arr = read_image(path)
        except ImageReadError as e:
            assert str(path) in str(e) and e.reason
            return
    assert arr.dtype == np.float32 and arr.ndim == 2 and arr.size > 0
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0


# ----------------------------------------------------------------------------------------------- images

SUFFIXES = st.sampled_from([".png", ".jpg", ".dcm", ".tif", "", ".bin"])


@given(data=st.binary(max_size=4096), suffix=SUFFIXES)
@example(data=b"\x89PNG\r\n\x1a\n", suffix=".dcm")
@example(data=b"\x00" * 128 + b"DICM", suffix=".png")
@example(data=b"II*\x00" + b"\x00" * 8, suffix=".tif")
def test_random_bytes(scratch, data, suffix):
    p = scratch / f"random{suffix}"
    p.write_bytes(data)
    _read_or_refuse(p)


@st.composite
def pil_images(draw) -> bytes:
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    kind = draw(st.sampled_from(["L", "I;16", "RGB", "RGBA", "LA", "P", "1", "F", "jpeg-L", "jpeg-RGB"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "I;16":
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)).save(buf, format="PNG")
        return buf.getvalue()
    if kind == "F":
        arr = rng.normal(size=(h, w)).astype(np.float32) * draw(st.sampled_from([1.0, 1e30, 1e-30]))
        if draw(st.booleans()):
            arr.flat[draw(st.integers(0, h * w - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")
        return buf.getvalue()
    if kind.startswith("jpeg"):
        shape = (h, w) if kind == "jpeg-L" else (h, w, 3)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(
            buf, format="JPEG", quality=draw(st.integers(1, 100))
        )
        return buf.getvalue()
    channels = {"L": 0, "RGB": 3, "RGBA": 4, "LA": 2, "P": 0, "1": 0}[kind]
    arr = rng.integers(0, 256, (h, w, channels) if channels else (h, w)).astype(np.uint8)
    img = Image.fromarray(arr)
    if kind in ("P", "1"):
        img = img.convert(kind)
    elif kind == "LA":
        img = Image.fromarray(arr[..., 0]).convert("LA")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@given(data=pil_images(), suffix=SUFFIXES, cut=st.one_of(st.none(), st.integers(0, 400)))
def test_valid_and_truncated_png_jpeg_tiff(scratch, data, suffix, cut):
    p = scratch / f"pil{suffix}"
    p.write_bytes(data if cut is None else data[:cut])
    _read_or_refuse(p)


@st.composite
def dicoms(draw, folder: Path) -> Path:

    h, w = draw(st.integers(1, 32)), draw(st.integers(1, 32))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    path = folder / draw(st.sampled_from(["d.dcm", "d.png", "d"]))
    if draw(st.booleans()):  # float pixel data, possibly with NaN/Inf
        arr = rng.normal(size=(h, w)).astype(np.float32) * draw(st.sampled_from([1.0, 1e38]))
        if draw(st.booleans()):
            arr.flat[draw(st.integers(0, h * w - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        tags = {}
        if draw(st.booleans()):
            tags["RescaleSlope"] = draw(st.sampled_from(["1", "0", "-2.5", "1e308", "NaN"]))
            tags["RescaleIntercept"] = draw(st.sampled_from(["0", "-1024", "inf"]))
        return float_dicom(path, arr, **tags)
    bits = draw(st.sampled_from([1, 8, 12, 16]))
    signed = draw(st.booleans()) and bits > 8
    alloc = 8 if bits <= 8 else 16
    ds = minimal_dataset()  # a Secondary Capture, no Modality
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", ""]))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = alloc, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(alloc, signed)]
    info = np.iinfo(dtype)
    pix = rng.integers(max(info.min, -(2 ** (bits - 1))), min(info.max, 2**bits - 1) + 1, (h, w)).astype(dtype)
    data = pix.tobytes()
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # short pixel data
    ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")
    if draw(st.booleans()):
        ds.WindowCenter = draw(st.sampled_from(["100", "-5", "1e300", "0"]))
        ds.WindowWidth = draw(st.sampled_from(["200", "0", "-1", "1e-300"]))
    if draw(st.booleans()):
        ds.RescaleSlope = draw(st.sampled_from(["1", "0", "3.5", "-1"]))
        ds.RescaleIntercept = draw(st.sampled_from(["0", "-1024", "7"]))
    ds.save_as(path, enforce_file_format=True)
    return path


@given(data=st.data())
def test_dicoms_with_random_headers(scratch, data):
    path = data.draw(dicoms(scratch))
    _read_or_refuse(path)
    raw = bytearray(path.read_bytes())  # and the same file with random byte damage
    for _ in range(data.draw(st.integers(1, 8))):  # positions modulo the length: UIDs make it vary
        raw[data.draw(st.integers(0, 2**20)) % len(raw)] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw[: 1 + data.draw(st.integers(0, 2**20)) % len(raw)]))
    _read_or_refuse(path)


# ----------------------------------------------------------------------------------------------- manifests

CELLS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "[Pneumonia", "['Edema']", '["Edema", 3]', "Pneumonia, Edema", "No Finding",
                     "1", "train", "validate", "TEST", "../x.png", "/etc/shadow", "a.png ", "nan", "[]", "{}"]),
)  # fmt: skip
COLS = ["image_id", "study_id", "patient_id", "image_path", "labels", "boxes", "split", "report", "view"]


@given(
    rows=st.lists(st.fixed_dictionaries({c: CELLS for c in COLS}), max_size=12),
    drop=st.sets(st.sampled_from(COLS), max_size=3),
    fmt=st.sampled_from(["csv", "parquet"]),
)
@example(rows=[{c: "" for c in COLS}], drop=set(), fmt="csv")
@example(rows=[{**{c: "x" for c in COLS}, "image_path": "~0"}], drop=set(), fmt="csv")  # found: expanduser raised
def test_manifest_reader_and_validator(scratch, rows, drop, fmt):
    df = pd.DataFrame(rows, columns=COLS).drop(columns=sorted(drop))
    path = scratch / f"m.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    with no_hang():
        try:
            m = read_manifest(path)
            validate_manifest(m, check_files=True)
            checked = check_manifest(m, skip_bad_rows=True)
        except ManifestError as e:
            assert str(e).count("\n") == 0
            return
    for col in ("image_id", "study_id", "patient_id"):  # what passes the gate has ids, parsed labels, a split
        assert all(str(v).strip() for v in checked.rows[col])
    assert all(isinstance(v, list) and all("," not in x for x in v) for v in checked.rows["labels"])
    assert set(checked.rows["split"]) <= {"", "train", "val", "test"}
    assert len(checked.rows) + len(checked.refused) == len(m)


# ----------------------------------------------------------------------------------------------- index open


@pytest.fixture(scope="module")
def pristine(scratch) -> dict[str, Path]:
    return {f: vector_index(scratch / f"idx-{f}", n=120, d=8, factory=f) for f in ("Flat", "HNSW8,Flat", "IVF4,Flat")}


def _damage(root: Path, data: st.DataObject) -> bool:
    """Truncate, extend or bit-flip one file of the index (the pointer and info included); True if changed."""
    gen = store.resolve(root).gen_dir
    names = [store.IMAGES_FILE, store.REPORTS_FILE, store.META_FILE, store.INFO_FILE]
    target = data.draw(st.sampled_from([*[gen / n for n in names], root / store.CURRENT_FILE]))
    raw = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "flips", "append", "zero"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    elif how == "zero":
        raw = bytearray()
    else:
        for _ in range(1 if how == "flip" else data.draw(st.integers(2, 16))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    changed = bytes(raw) != target.read_bytes()
    target.write_bytes(bytes(raw))
    return changed


def _served(root: Path, opener: Callable[[], object]) -> bool:
    with no_hang():
        try:
            idx = opener()
        except IndexError_ as e:
            assert str(e).count("\n") == 0
            return False
    if isinstance(idx, store.CXRIndex):
        Searcher(idx).search_ids(np.eye(idx.dim, dtype=np.float32)[:2], k=5, target="images")
    return True


def _verify_refuses_if(root: Path, changed: bool) -> None:
    """`verify_index` refuses the folder (IndexError_) exactly when its damage changed a byte, within the time limit."""
    with no_hang():
        try:
            verify.verify_index(root)
            assert not changed
        except IndexError_:
            assert changed


@given(data=st.data(), factory=st.sampled_from(["Flat", "HNSW8,Flat", "IVF4,Flat"]))
def test_a_damaged_index_is_never_served(pristine, scratch, data, factory):
    root = scratch / "work"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine[factory], root)
    changed = _damage(root, data)
    served = _served(root, lambda: store.open_index(root))
    assert served == (not changed)  # full checks at open: any damage is refused
    _verify_refuses_if(root, changed)


@given(data=st.data())
def test_quick_checks_never_crash(pristine, scratch, data, monkeypatch_module):
    """Open with only the quick checks (sizes, head/tail hashes, schema), as for an index over 256 MiB: damage
    may pass to search, but only the project's errors escape, and verify still refuses it."""
    root = scratch / "work-quick"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine["Flat"], root)
    changed = _damage(root, data)
    try:
        _served(root, lambda: store.open_index(root, full=False))
    except CXRError:
        assert changed
    _verify_refuses_if(root, changed)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ----------------------------------------------------------------------------------------------- regressions
# Crashes the fuzzers found (HYPOTHESIS_PROFILE=fuzz), kept as plain examples.


def test_regression_dicom_with_an_unknown_vr_is_an_image_read_error(scratch):
    """A damaged VR byte made pydicom raise NotImplementedError on first access to the element."""
    pixels = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    path = float_dicom(scratch / "vr.dcm", pixels)
    raw = path.read_bytes()
    at = raw.index(b"\x28\x00\x04\x00CS")  # (0028,0004) PhotometricInterpretation, VR CS
    path.write_bytes(raw[: at + 5] + b"\x00" + raw[at + 6 :])
    with pytest.raises(ImageReadError, match="vr.dcm"):
        read_image(path)


def test_regression_a_pointer_without_its_newline_is_damage(pristine, scratch):
    """CURRENT cut by one byte (its newline) used to pass; the pointer must be exactly as written."""
    root = scratch / "ptr"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine["Flat"], root)
    p = root / store.CURRENT_FILE
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(IndexError_, match="CURRENT: damaged pointer"):
        store.open_index(root)
