"""read_image: PNG/JPEG in every mode and bit depth, DICOM display pipeline, and every kind of bad input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

from retrieval.data.image_io import MAX_PIXELS, is_dicom, read_image
from retrieval.errors import CXRError, ImageReadError

LUMA = np.array([0.299, 0.587, 0.114])


def _gradient(h: int = 24, w: int = 32, maxval: int = 255, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, maxval + 1, size=(h, w))


def _check(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.dtype == np.float32 and arr.shape == shape and arr.flags["C_CONTIGUOUS"]
    assert arr.min() >= 0.0 and arr.max() <= 1.0


# --------------------------------------------------------------------------------------------- PNG / JPEG


def test_png_8bit_grey_is_exact(tmp_path):
    a = _gradient().astype(np.uint8)
    Image.fromarray(a, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    _check(out, a.shape)
    np.testing.assert_allclose(out, a / 255.0, atol=1e-6)


def test_png_16bit_grey_keeps_precision(tmp_path):
    a = _gradient(maxval=65535).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    _check(out, a.shape)
    np.testing.assert_allclose(out, a / 65535.0, atol=1e-6)
    assert len(np.unique(out)) > 256  # more levels than 8 bits could hold


def test_png_rgb_is_luminance(tmp_path):
    rgb = np.stack([_gradient(seed=s) for s in range(3)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    np.testing.assert_allclose(read_image(tmp_path / "c.png"), (rgb / 255.0) @ LUMA, atol=1e-6)


def test_png_rgba_is_composited_over_black(tmp_path):
    rgba = np.stack([_gradient(seed=s) for s in range(4)], axis=-1).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    expected = ((rgba[..., :3] / 255.0) @ LUMA) * (rgba[..., 3] / 255.0)
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), expected, atol=1e-6)


def test_png_palette_uses_the_palette_colours(tmp_path):
    idx = _gradient(maxval=3).astype(np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 200, 200]
    img = Image.fromarray(idx, mode="P")
    img.putpalette(palette + [0] * (768 - len(palette)))
    img.save(tmp_path / "p.png")
    colours = np.array(palette).reshape(4, 3) / 255.0
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), colours[idx] @ LUMA, atol=1e-6)


def test_jpeg_grey_and_rgb(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = ((xx + yy) * 2).astype(np.uint8)  # smooth, so JPEG error stays small
    Image.fromarray(smooth, mode="L").save(tmp_path / "g.jpg", quality=100)
    Image.fromarray(np.stack([smooth] * 3, -1), mode="RGB").save(tmp_path / "c.jpeg", quality=100)
    for name in ("g.jpg", "c.jpeg"):
        out = read_image(tmp_path / name)
        _check(out, smooth.shape)
        assert np.abs(out - smooth / 255.0).max() < 0.03


def test_min_size_decodes_a_large_jpeg_reduced_but_keeps_twice_the_target(tmp_path):
    """A 1600x1200 JPEG read for a 224 px model comes back reduced by libjpeg (1/2 scale: 800x600, still >= 2x
    224 on the long side), close to a full decode box-averaged 2x2 (the naive reference); a PNG, and a JPEG
    under 4x the target, are read at full size."""
    yy, xx = np.mgrid[0:1200, 0:1600]
    smooth = (0.5 + 0.4 * np.sin(xx / 90.0) * np.cos(yy / 70.0)) * 255
    jpg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    Image.fromarray(smooth.astype(np.uint8), mode="L").save(jpg, quality=95)
    Image.fromarray(smooth.astype(np.uint8), mode="L").save(png)
    full = read_image(jpg)
    reduced = read_image(jpg, min_size=224)
    assert full.shape == (1200, 1600) and reduced.shape == (600, 800)
    naive = full.reshape(600, 2, 800, 2).mean(axis=(1, 3))
    assert np.abs(reduced - naive).mean() < 0.01
    assert read_image(png, min_size=224).shape == (1200, 1600)
    assert read_image(jpg, min_size=500).shape == (1200, 1600)  # 1600 < 4 x 500: no reduction
    with pytest.raises(ImageReadError, match="over the limit"):  # the pixel limit is on the stored size
        read_image(jpg, max_pixels=1600 * 1200 - 1, min_size=224)


def test_exif_orientation_is_applied(tmp_path):
    a = _gradient(h=10, w=30).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(a, mode="L").save(tmp_path / "o.png", exif=exif)
    out = read_image(tmp_path / "o.png")
    assert out.shape == (30, 10)
    np.testing.assert_allclose(out, np.rot90(a, k=-1) / 255.0, atol=1e-6)


# --------------------------------------------------------------------------------------------- bad files


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not an image\n" * 10), "not an image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), ""),
    ],
    ids=["zero-bytes", "text", "png-magic-garbage"],
)
def test_bad_files_raise_image_read_error(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path) and reason in info.value.reason
    assert str(path) in str(info.value) and isinstance(info.value, CXRError)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_files(tmp_path, fmt):
    a = _gradient(h=128, w=128).astype(np.uint8)
    good = tmp_path / f"good.{fmt}"
    Image.fromarray(a, mode="L").save(good)
    data = good.read_bytes()
    bad = tmp_path / f"cut.{fmt}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated|corrupt"):
        read_image(bad)


def test_pixel_limit_from_the_header_without_decoding(tmp_path):
    side = int(np.sqrt(MAX_PIXELS)) + 10  # over our limit, under PIL's own bomb threshold
    _png_header_only(tmp_path / "big.png", side, side)
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(tmp_path / "big.png")
    a = _gradient().astype(np.uint8)
    Image.fromarray(a, mode="L").save(tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="over the limit of 100 pixels"):
        read_image(tmp_path / "small.png", max_pixels=100)


def test_pil_decompression_bomb_becomes_image_read_error(tmp_path, monkeypatch):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # PIL's DecompressionBombError
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(tmp_path / "bomb.png", max_pixels=10**12)
    a = _gradient().astype(np.uint8)  # 768 pixels: over a lowered PIL limit (warning), not over twice it
    Image.fromarray(a, mode="L").save(tmp_path / "warn.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(tmp_path / "warn.png")


# --------------------------------------------------------------------------------------------- DICOM


def _dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    signed: bool = False,
    preamble: bool = True,
    **tags,
) -> Path:
    """Write a minimal uncompressed DICOM (secondary capture) with `pixels` and any extra tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tags.pop("syntax", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = pixels.shape[0] if pixels.ndim == 3 and photometric != "RGB" else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:] if photometric != "RGB" else pixels.shape[:2]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    for key, value in tags.items():
        setattr(ds, key, value)
    if "PixelData" not in tags:
        ds.PixelData = pixels.astype(dtype).tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta  # a bare dataset: no preamble, no 'DICM', no file meta
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    return path


def _window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, output in [0, 1] (the naive reference)."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    y = (x - (c - 0.5)) / (w - 1) + 0.5
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y))


def test_monochrome1_with_rescale_and_window_matches_numpy_reference(tmp_path):
    raw = _gradient(h=20, w=30, maxval=4095, seed=3)
    slope, intercept, centre, width = 2.0, -1024.0, 1500.0, 3000.0
    path = _dicom(
        tmp_path / "m1.dcm",
        raw,
        "MONOCHROME1",
        bits=12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        RescaleType="US",
        WindowCenter=centre,
        WindowWidth=width,
    )
    expected = 1.0 - _window(raw * slope + intercept, centre, width)  # rescale, window, then invert
    out = read_image(path)
    _check(out, raw.shape)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert (out == 1.0).any() and (out == 0.0).any()  # the window clips at both ends here


def test_monochrome2_without_window_is_stretched(tmp_path):
    raw = _gradient(maxval=1000, seed=4) + 100
    path = _dicom(tmp_path / "m2.dcm", raw, RescaleSlope=0.5, RescaleIntercept=10.0)
    v = raw * 0.5 + 10.0
    np.testing.assert_allclose(read_image(path), (v - v.min()) / (v.max() - v.min()), atol=1e-6)


def test_signed_pixels_with_multi_valued_window_uses_the_first(tmp_path):
    raw = _gradient(maxval=2000, seed=5) - 1000
    path = _dicom(tmp_path / "s.dcm", raw, bits=16, signed=True, WindowCenter=[0.0, 500.0], WindowWidth=[800.0, 50.0])
    np.testing.assert_allclose(read_image(path), _window(raw.astype(float), 0.0, 800.0), atol=1e-5)


def test_voi_lut_sequence(tmp_path):
    raw = _gradient(maxval=255, seed=6)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    table = (255 - np.arange(256)).astype(np.uint16)  # an inverting LUT
    lut.add_new(0x00283006, "US", table.tolist())  # LUT Data
    path = _dicom(tmp_path / "lut.dcm", raw, bits=8, VOILUTSequence=[lut])
    np.testing.assert_allclose(read_image(path), table[raw] / 255.0, atol=1e-6)


def test_multi_frame_takes_the_first_frame(tmp_path):
    frames = np.stack([_gradient(seed=s, maxval=4095) for s in range(3)])
    path = _dicom(tmp_path / "mf.dcm", frames, bits=12, WindowCenter=2048.0, WindowWidth=4096.0)
    np.testing.assert_allclose(read_image(path), _window(frames[0].astype(float), 2048.0, 4096.0), atol=1e-5)


def test_rgb_dicom_becomes_luminance(tmp_path):
    rgb = np.stack([_gradient(seed=s) for s in range(3)], axis=-1)
    path = _dicom(tmp_path / "rgb.dcm", rgb, "RGB", bits=8)
    np.testing.assert_allclose(read_image(path), (rgb / 255.0) @ LUMA, atol=1e-6)


def test_dicom_is_detected_by_content_not_extension(tmp_path):
    raw = _gradient(maxval=255, seed=7)
    path = _dicom(tmp_path / "looks_like.png", raw, bits=8)
    assert is_dicom(path)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)
    bare = _dicom(tmp_path / "no_preamble_no_suffix", raw, bits=8, preamble=False)
    assert not is_dicom(bare)
    np.testing.assert_allclose(read_image(bare), expected, atol=1e-6)


def test_dicom_without_pixel_data(tmp_path):
    path = _dicom(tmp_path / "np.dcm", _gradient(), bits=8)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(path)


def test_unsupported_photometric_interpretation(tmp_path):
    path = _dicom(tmp_path / "pal.dcm", _gradient(), "PALETTE COLOR", bits=8)
    with pytest.raises(ImageReadError, match="photometric interpretation 'PALETTE COLOR'"):
        read_image(path)


def test_compressed_transfer_syntax_without_decoder(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder

    path = _dicom(
        tmp_path / "jls.dcm",
        _gradient(),
        bits=8,
        syntax=JPEGLSLossless,
        PixelData=encapsulate([b"\xff\xd8 not really jpeg-ls \xff\xd9"]),
    )
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    if not get_decoder(JPEGLSLossless).is_available:  # the usual case: no pyjpegls/pylibjpeg/gdcm here
        assert "JPEG-LS" in info.value.reason and "not installed" in info.value.reason
    else:  # a decoder is installed: the garbage stream must still fail cleanly
        assert "decode" in info.value.reason


def test_truncated_dicom(tmp_path):
    path = _dicom(tmp_path / "t.dcm", _gradient(h=64, w=64, maxval=4095), bits=12)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError, match="DICOM"):
        read_image(path)


def test_dicom_pixel_limit(tmp_path):
    path = _dicom(tmp_path / "big.dcm", _gradient(), bits=8)
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(path, max_pixels=100)


def test_monochrome1_without_window_is_stretched_then_inverted(tmp_path):
    raw = _gradient(maxval=4095, seed=8)
    path = _dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", bits=12)
    np.testing.assert_allclose(read_image(path), 1.0 - (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


@pytest.mark.realdata
def test_real_images_read_in_every_mode(shared_data):
    paths = (
        sorted((shared_data / "covid-cxr" / "images").iterdir())[::15]
        + sorted((shared_data / "tbx11k-tb" / "images").iterdir())[:5]
    )
    modes = set()
    for path in paths:
        with Image.open(path) as img:
            modes.add(img.mode)
            size = img.size
        out = read_image(path)
        _check(out, (size[1], size[0]))
        assert out.std() > 0.01  # a real radiograph, not a blank
    assert {"L", "RGB"} <= modes  # the set mixes grey and colour files


@pytest.mark.parametrize(
    ("centre", "width", "bad"),
    [(1000.0, "inf", "WindowWidth"), (1000.0, "NaN", "WindowWidth"), (1000.0, 0.0, "WindowWidth"),
     (1000.0, -5.0, "WindowWidth"), ("inf", 400.0, "WindowCenter"), ("NaN", 400.0, "WindowCenter"),
     ([1000.0, 20.0], ["inf", 40.0], "WindowWidth")],
)  # fmt: skip
def test_a_window_that_is_not_finite_or_not_positive_is_refused(tmp_path, centre, width, bad):
    """A WindowWidth of inf decoded to a flat grey image that was answered (issue 29, item 5)."""
    path = _dicom(tmp_path / "w.dcm", _gradient(maxval=2000, seed=5), bits=12, WindowCenter=centre, WindowWidth=width)
    with pytest.raises(ImageReadError, match=f"w.dcm.*{bad}"):
        read_image(path)
