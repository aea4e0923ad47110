"""Uploaded images: what type they are, and their pixels through the project's one reader.

The type comes from the bytes (PNG and JPEG signatures, DICOM's 'DICM' at byte 128), or, for a DICOM without
the Part 10 preamble, from a `.dcm` name or an `application/dicom` content type. Anything else is refused
(HTTP 415) before it reaches a decoder. `read_image` needs a path, so the bytes go to a file in the server's own
temporary folder, named by a random token (never by the uploaded name) and removed in a `finally`, whether
the reader accepts the image or not.

Before any pixel is decoded, the header is read (`probe`): an image over the pixel limit, or one whose decode
would need more than the memory limit per request (the reader works in float64 per channel: an RGBA PNG costs
about 44 bytes a pixel, a grey one 17), is refused from its width, height and mode alone. A small file of many
pixels (a 261 KB PNG of 8192 x 8192 RGBA) so never allocates its pixels.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
from pathlib import Path

import numpy as np

from retrieval.errors import CXRError, ImageReadError

log = logging.getLogger(__name__)

SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
SUPPORTED = "PNG, JPEG or DICOM"
DICOM_NAMES = (".dcm", ".dicom", ".dic")
DICOM_TYPES = ("application/dicom", "application/dicom+octet-stream")


class UploadError(CXRError):
    """A request the server refuses: `status` is the HTTP status (413, 415, 422), the message says why."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def sniff(data: bytes, filename: str = "", content_type: str = "") -> str | None:
    """'png', 'jpeg' or 'dicom' from the upload's first bytes (or its name/type for preamble-less DICOM)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    ctype = (content_type or "").split(";")[0].strip().lower()
    if Path(filename or "").suffix.lower() in DICOM_NAMES or ctype in DICOM_TYPES:
        return "dicom"
    return None


def probe(data: bytes, kind: str) -> tuple[int, int, int] | None:
    """(width, height, bytes a pixel takes to decode) from the image's header alone, or None when the header
    does not parse (the reader then says why). The bytes a pixel: its raw samples, a float64 per channel for the
    conversion to grey and 8 for the grey result and its transform."""
    try:
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            channels = int(ds.get("SamplesPerPixel", 1) or 1)
            raw = channels * max(1, int(ds.get("BitsAllocated", 16) or 16) // 8)
            return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), raw + 8 * channels + 16
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header, not the pixels
            channels = 4 if img.mode in ("P", "PA") else len(img.getbands())  # palettes become RGBA
            raw = 2 * channels if img.mode.startswith("I;16") else 4 * channels if img.mode in ("I", "F") else channels
            return int(img.width), int(img.height), raw + 8 * channels + 8
    except Exception:  # noqa: BLE001 - a header that does not parse is the reader's to report
        return None


def check_size(name: str, data: bytes, kind: str, max_pixels: int, max_decode_bytes: int | None) -> None:
    """Refuse (422) an upload whose header names more pixels than `max_pixels`, or a decode over
    `max_decode_bytes`, before anything is decoded."""
    size = probe(data, kind)
    if size is None:
        return
    w, h, per_pixel = size
    if w * h > max_pixels:
        raise UploadError(422, f"{name}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
    if max_decode_bytes is not None and w * h * per_pixel > max_decode_bytes:
        need, limit = w * h * per_pixel / 2**20, max_decode_bytes / 2**20
        raise UploadError(
            422, f"{name}: {w}x{h} pixels would need about {need:,.0f} MB to decode; the limit is {limit:,.0f} MB"
        )


def decode_upload(
    data: bytes,
    filename: str,
    content_type: str,
    tmp_dir: str | Path,
    max_pixels: int | None = None,
    min_size: int | None = None,
    max_decode_bytes: int | None = None,
) -> np.ndarray:
    """The upload's pixels as read_image returns them (float32 HxW in [0, 1]; a JPEG possibly reduced to no less
    than `min_size` on its longest side).

    Raises UploadError: 422 for an empty upload, one over `max_pixels` or `max_decode_bytes` (from its header,
    before decoding) or one the reader refuses (its reason, under the uploaded name), 415 for a type that is
    not PNG, JPEG or DICOM."""
    from retrieval.data.image_io import MAX_PIXELS, read_image

    name = Path(filename or "upload").name or "upload"
    if not data:
        raise UploadError(422, f"{name}: empty upload (0 bytes)")
    kind = sniff(data, name, content_type)
    if kind is None:
        shown = (content_type or "unknown").split(";")[0]
        raise UploadError(415, f"{name}: unsupported image type ({shown}); send {SUPPORTED}")
    check_size(name, data, kind, max_pixels or MAX_PIXELS, max_decode_bytes)
    path = Path(tmp_dir) / f"upload-{secrets.token_hex(8)}{SUFFIX[kind]}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_image(path, max_pixels=max_pixels or MAX_PIXELS, min_size=min_size)
    except ImageReadError as e:
        raise UploadError(422, f"{name}: {e.reason}") from None
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
