"""Read any chest radiograph (PNG, JPEG, DICOM) into one form: a float32 HxW grey array in [0, 1].

PNG/JPEG go through Pillow (8 and 16 bit; grey, RGB, RGBA, palette; the EXIF orientation is applied).
DICOM goes through pydicom and follows the display pipeline of the standard (PS3.4 N.2; seed 001 appendix
A.1; torchxrayvision's `read_xray_dcm`): modality LUT / rescale slope+intercept, then the VOI LUT or window
centre/width, then MONOCHROME1 inversion. DICOM is recognised by its content (the 'DICM' preamble), not only
by its extension, and so are PNG/JPEG/TIFF (a PNG named `.dcm` is read as a PNG). NaN/Inf pixels are refused on
the raw (and rescaled) values, before any min/max stretch could hide them. Every failure is an
`ImageReadError(path, reason)`.

`min_size`: a caller that will shrink the image anyway (a model's transform) may let libjpeg decode a JPEG at the
smallest DCT scale (1/2, 1/4 or 1/8) whose longest side is still >= `min_size` (Pillow's `draft`). The scaling
happens inside the decoder (an antialiased reduction), so a 1024 px JPEG for a 224 px model decodes about 5x faster
(benchmarks/results/serve_latency_cpu.md); other formats are always read at full size.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ImageReadError

# Larger images are refused (decompression-bomb guard). 8192 x 8192 covers every radiograph detector.
MAX_PIXELS = 8192 * 8192
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour DICOMs (secondary captures) are turned into grey; pydicom already converts YBR to RGB when decoding.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_LUMA = np.array([0.299, 0.587, 0.114])


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
    (b"GIF8", "gif"),
)


def sniff(path: str | Path) -> str | None:
    """What the file is by its content: 'dicom' ('DICM' at byte 128), 'png', 'jpeg', 'tiff', 'bmp', 'gif', or
    None when its first bytes say nothing (a DICOM without preamble, or not an image)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def _check_finite(path: Path, arr: np.ndarray, stage: str) -> None:
    """Refuse NaN/Inf before any scaling: a min/max stretch would turn one NaN pixel into an all-black image."""
    if arr.dtype.kind in "fc":
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(arr.size - np.count_nonzero(finite))
            raise ImageReadError(path, f"{bad} of {arr.size} {stage} pixel values are not finite (NaN or Inf)")


def is_dicom(path: str | Path) -> bool:
    """True when the file carries the DICOM 'DICM' magic at byte 128 (Part 10 file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS, min_size: int | None = None) -> np.ndarray:
    """The image at `path` as a C-contiguous float32 HxW array in [0, 1] (0 = black, as displayed).

    `min_size`: a JPEG may come back reduced (by 2, 4 or 8) as long as its longest side stays >= min_size.

    Raises ImageReadError for a missing, empty, truncated or non-image file, an image over `max_pixels`
    pixels, and DICOMs without pixel data or with an unsupported photometric interpretation or transfer
    syntax."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot open: {e.strerror or e}") from None
    if not path.is_file():
        raise ImageReadError(path, "not a file")
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    kind = sniff(path)  # the content decides; the extension only when the content says nothing
    if kind == "dicom":
        arr = _read_dicom(path, max_pixels)
    elif kind is None and path.suffix.lower() in DICOM_SUFFIXES:
        arr = _read_dicom(path, max_pixels, force=True)
    else:
        arr = _read_pil(path, max_pixels, min_size)
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(path, f"decoded to an array of shape {arr.shape}, expected a 2-D image")
    arr = np.ascontiguousarray(arr, dtype=np.float32)  # no copy when the decoder already gave float32
    if not np.isfinite(arr).all():
        raise ImageReadError(path, "pixel values are not finite")
    return np.clip(arr, 0.0, 1.0, out=arr if arr.flags.writeable else None)


# --------------------------------------------------------------------------------------------- PNG / JPEG


def _read_pil(path: Path, max_pixels: int, min_size: int | None = None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageReadError(path, f"{w}x{h} pixels is over the limit of {max_pixels} pixels")
                if min_size and img.format == "JPEG" and max(w, h) >= 4 * min_size:
                    scale = 2 * min_size / max(w, h)  # draft keeps both sides >= the request: ask the scaled size
                    img.draft(img.mode, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
                img.load()
                img = ImageOps.exif_transpose(img)
                return _pil_to_grey(img, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        arr = _try_dicom_without_preamble(path, max_pixels)
        if arr is None:
            raise ImageReadError(path, "not an image (neither PNG/JPEG nor DICOM)") from None
        return arr
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL reports truncation/corruption with these
        raise ImageReadError(path, f"corrupt or truncated image: {e}") from None


def _pil_to_grey(img: Any, path: Path | None = None) -> np.ndarray:
    """Pillow image -> float grey in [0, 1], by mode: bit depth decides the scale, colour becomes luminance,
    transparency is composited over black."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float64)
    # 8- and 16-bit grey (nearly every radiograph) straight to float32: half the memory traffic of float64
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / np.float32(255.0)
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32) / np.float32(65535.0)
    if mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        _check_finite(path or Path(getattr(img, "filename", "") or "image"), arr, "raw")
        if mode == "I" and arr.min() >= 0 and arr.max() <= 65535:  # 16-bit data in a 32-bit container
            return arr / 65535.0
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "LA":
        la = np.asarray(img, dtype=np.float64) / 255.0
        return la[..., 0] * la[..., 1]
    if mode == "RGBA":
        rgba = np.asarray(img, dtype=np.float64) / 255.0
        return (rgba[..., :3] @ _LUMA) * rgba[..., 3]
    if mode != "RGB":
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    return (np.asarray(img, dtype=np.float64) / 255.0) @ _LUMA


# --------------------------------------------------------------------------------------------- DICOM


def _try_dicom_without_preamble(path: Path, max_pixels: int) -> np.ndarray | None:
    """A DICOM without the 128-byte preamble and without a .dcm name; None when it is not one."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        if "Rows" not in ds or "Columns" not in ds:  # (pixel data itself is not read with stop_before_pixels)
            return None
    except Exception:
        return None
    return _read_dicom(path, max_pixels, force=True)


def _voi_output_range(ds: Any) -> tuple[float, float]:
    """The output range of pydicom's `apply_windowing` for this dataset (it mirrors pydicom's own rule)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _check_window(path: Path, ds: Any) -> None:
    """The window that applies (the first of several) must be finite, with a positive width: an infinite or NaN
    one decodes to a flat or undefined image that would be answered as if it were a radiograph."""
    from pydicom.multival import MultiValue

    for name in ("WindowCenter", "WindowWidth"):
        value = ds.get(name)
        first = value[0] if isinstance(value, list | tuple | MultiValue) else value
        try:
            x = float(first)
        except (TypeError, ValueError):
            raise ImageReadError(path, f"{name} {first!r} is not a number") from None
        if not np.isfinite(x) or (name == "WindowWidth" and x <= 0):
            need = "a finite number above 0" if name == "WindowWidth" else "a finite number"
            raise ImageReadError(path, f"{name} is {x}, it must be {need}")


def _transfer_syntax(ds: Any) -> Any:
    """The dataset's transfer syntax; for a bare dataset (no file meta) the encoding pydicom read it with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") is not None:
        return meta.TransferSyntaxUID
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    return syntax


def _read_dicom(path: Path, max_pixels: int, force: bool = False) -> np.ndarray:
    """Decode a DICOM; pydicom parses elements lazily, so a damaged header can raise anything on first access
    (found by fuzzing: NotImplementedError for an unknown VR): every such error becomes an ImageReadError."""
    try:
        return _decode_dicom(path, max_pixels, force)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(path, f"corrupt DICOM: {type(e).__name__}: {str(e)[:160]}") from None


def _decode_dicom(path: Path, max_pixels: int, force: bool = False) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
    from pydicom.pixels.decoders.base import get_decoder

    try:
        ds = pydicom.dcmread(path, force=force)
    except InvalidDicomError as e:
        raise ImageReadError(path, f"not a valid DICOM file: {e}") from None
    except Exception as e:  # truncated headers raise EOFError, OSError, struct errors ...
        raise ImageReadError(path, f"corrupt or truncated DICOM: {type(e).__name__}: {e}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise ImageReadError(path, f"unsupported photometric interpretation {photometric or '(missing)'!r}")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > max_pixels:
        raise ImageReadError(path, f"{cols}x{rows} pixels is over the limit of {max_pixels} pixels")
    syntax = _transfer_syntax(ds)
    if syntax is not None:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ImageReadError(path, f"unsupported transfer syntax {syntax} ({syntax.name})") from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin"
            raise ImageReadError(
                path,
                f"transfer syntax {syntax.name} ({syntax}) needs a decoder that is not installed: {missing}",
            )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array  # multi-frame: the first frame
    except Exception as e:  # short pixel data, bad encapsulation, decoder failure
        raise ImageReadError(path, f"cannot decode DICOM pixel data: {type(e).__name__}: {e}") from None

    _check_finite(path, arr, "raw")
    if photometric in _COLOUR:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageReadError(path, f"{photometric} DICOM decoded to shape {arr.shape}")
        return (arr.astype(np.float64) @ _LUMA) / float(2 ** int(ds.BitsStored) - 1)
    if arr.ndim != 2:
        raise ImageReadError(path, f"DICOM decoded to shape {arr.shape}, expected one 2-D frame")

    try:
        arr = apply_modality_lut(arr, ds)
        _check_finite(path, np.asarray(arr), "rescaled")
        has_lut = bool(ds.get("VOILUTSequence"))
        has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
        if has_window and not has_lut:
            _check_window(path, ds)
        if has_lut or has_window:
            if has_lut and arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)):
                arr = arr.astype(np.int64)  # a LUT indexes integers (pydicom warns on float input)
            arr = apply_voi_lut(arr, ds, index=0)
            if has_lut:
                lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            else:
                lo, hi = _voi_output_range(ds)
        else:  # no display transform given: stretch the rescaled values to the full range
            lo, hi = float(arr.min()), float(arr.max())
    except ImageReadError:
        raise
    except Exception as e:  # malformed LUT or window values
        raise ImageReadError(path, f"cannot apply the DICOM LUT/window: {type(e).__name__}: {e}") from None
    arr = np.asarray(arr, dtype=np.float64)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageReadError(path, f"the DICOM display range is not finite ({lo}, {hi}): bad window or LUT values")
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":  # 0 = white in MONOCHROME1; inverted after the VOI transform
        out = 1.0 - out
    return out
