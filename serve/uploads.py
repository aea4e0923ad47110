"""Uploaded images: what type they are, and their pixels through the project's one reader.

The type comes from the bytes (PNG and JPEG signatures, DICOM's 'DICM' at byte 128), or, for a DICOM without
the Part 10 preamble, from a `.dcm` name or an `application/dicom` content type. Anything else is refused
(HTTP 415) before it reaches a decoder. `read_image` needs a path, so the bytes go to a file in the server's own
temporary folder, named by a random token (never by the uploaded name) and removed in a `finally`, whether
the reader accepts the image or not.
"""

from __future__ import annotations

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


def decode_upload(
    data: bytes,
    filename: str,
    content_type: str,
    tmp_dir: str | Path,
    max_pixels: int | None = None,
    min_size: int | None = None,
) -> np.ndarray:
    """The upload's pixels as read_image returns them (float32 HxW in [0, 1]; a JPEG possibly reduced to no less
    than `min_size` on its longest side).

    Raises UploadError: 422 for an empty upload or one the reader refuses (its reason, under the uploaded
    name), 415 for a type that is not PNG, JPEG or DICOM."""
    from retrieval.data.image_io import MAX_PIXELS, read_image

    name = Path(filename or "upload").name or "upload"
    if not data:
        raise UploadError(422, f"{name}: empty upload (0 bytes)")
    kind = sniff(data, name, content_type)
    if kind is None:
        shown = (content_type or "unknown").split(";")[0]
        raise UploadError(415, f"{name}: unsupported image type ({shown}); send {SUPPORTED}")
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
