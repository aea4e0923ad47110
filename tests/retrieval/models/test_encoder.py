"""The encode API: shapes, dtypes, norms, order, batch sizes, precision, paths and workers, preprocessing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from tiny_model import tiny_model

from retrieval.errors import ImageReadError
from retrieval.models import CXRModel, GreyImageTransform, load_model

TEXTS = [
    "No acute cardiopulmonary abnormality.",
    "Large right pleural effusion.",
    "Heart size is enlarged. Mild pulmonary edema.",
    "Left lower lobe consolidation concerning for pneumonia.",
    "Right pneumothorax",
    "Support devices in place; endotracheal tube 4 cm above the carina.",
    "Normal chest.",
    "Nodular opacity in the right upper lobe, possibly tuberculosis.",
    "",
]


@pytest.fixture(scope="module")
def model() -> CXRModel:
    """The tiny HF-text-tower model of test_models (a small BERT + the bundled MiniLM tokenizer)."""
    return tiny_model(hf_text=True)


def grey_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(40, 30), (32, 32), (25, 61), (80, 80), (33, 17)]
    return [rng.random(shapes[i % len(shapes)], dtype=np.float32) for i in range(n)]


def check_embeddings(emb: np.ndarray, n: int, dim: int) -> None:
    assert emb.shape == (n, dim)
    assert emb.dtype == np.float32 and emb.flags.c_contiguous
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


# ---- outputs -------------------------------------------------------------------------------------------------
def test_encode_images_output(model):
    images = grey_images(11)
    emb = model.encode_images(images, batch_size=4)
    check_embeddings(emb, 11, model.embed_dim)
    assert len({tuple(np.round(r, 5)) for r in emb}) == 11  # different images, different vectors
    empty = model.encode_images([])
    assert empty.shape == (0, model.embed_dim) and empty.dtype == np.float32


def test_encode_texts_output(model):
    emb = model.encode_texts(TEXTS, batch_size=4)
    check_embeddings(emb, len(TEXTS), model.embed_dim)
    assert model.encode_texts([]).shape == (0, model.embed_dim)


def test_encode_matches_the_building_blocks(model):
    images = grey_images(3)
    t = model.image_transform()
    pixels = torch.stack([t(a) for a in images])
    with torch.no_grad():
        want = model.project_images(model.image_features(pixels)).numpy()
        want_t = model.project_texts(model.text_features(model.tokenize(TEXTS[:3]))).numpy()
    np.testing.assert_allclose(model.encode_images(images), want, atol=1e-6)
    np.testing.assert_allclose(model.encode_texts(TEXTS[:3]), want_t, atol=1e-6)
    # preprocessed tensors, one by one or as a 4-D batch, give the same vectors
    np.testing.assert_allclose(model.encode_images(list(pixels)), want, atol=1e-6)
    np.testing.assert_allclose(model.encode_images(pixels), want, atol=1e-6)


def test_order_preserved_across_batch_sizes(model):
    images = grey_images(13, seed=1)
    one = model.encode_images(images, batch_size=1)
    seven = model.encode_images(images, batch_size=7)
    np.testing.assert_allclose(one, seven, atol=1e-5)
    # and in input order: reversing the input reverses the output
    np.testing.assert_allclose(model.encode_images(images[::-1], batch_size=7), one[::-1], atol=1e-5)
    t1 = model.encode_texts(TEXTS, batch_size=1)
    t7 = model.encode_texts(TEXTS, batch_size=7)
    np.testing.assert_allclose(t1, t7, atol=1e-5)  # padding to different widths changes nothing
    np.testing.assert_allclose(model.encode_texts(TEXTS[::-1], batch_size=7), t1[::-1], atol=1e-5)


def test_bf16_close_to_fp32(model):
    images = grey_images(6)
    fp32 = model.encode_images(images)
    bf16 = model.encode_images(images, precision="bf16")
    check_embeddings(bf16, 6, model.embed_dim)
    assert (np.sum(fp32 * bf16, axis=1) > 0.99).all()
    t32 = model.encode_texts(TEXTS)
    t16 = model.encode_texts(TEXTS, precision="bf16")
    check_embeddings(t16, len(TEXTS), model.embed_dim)
    assert (np.sum(t32 * t16, axis=1) > 0.99).all()


def test_bad_precision_and_fp16_on_cpu(model):
    with pytest.raises(ValueError, match="precision"):
        model.encode_texts(TEXTS, precision="int8")
    with pytest.raises(ValueError, match="fp16"):
        model.encode_texts(TEXTS, precision="fp16", device="cpu")


def test_model_stays_in_its_training_mode(model):
    model.train()
    model.encode_texts(TEXTS[:2])
    assert model.training
    model.eval()


# ---- paths, workers, errors ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def png_paths(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, a in enumerate(grey_images(5, seed=2)):
        p = folder / f"img{i}.png"
        Image.fromarray((a * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def test_paths_go_through_read_image(model, png_paths):
    from retrieval.data.image_io import read_image

    want = model.encode_images([read_image(p) for p in png_paths])
    np.testing.assert_allclose(model.encode_images(png_paths), want, atol=1e-6)
    np.testing.assert_allclose(model.encode_images([str(p) for p in png_paths]), want, atol=1e-6)


def test_worker_processes_give_the_same_vectors(model, png_paths):
    mixed = [*png_paths, *grey_images(2)]
    serial = model.encode_images(mixed, batch_size=3)
    workers = model.encode_images(mixed, batch_size=3, num_workers=2)
    np.testing.assert_allclose(workers, serial, atol=1e-6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_image_raises_naming_the_file(model, png_paths, tmp_path, num_workers):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError) as e:
        model.encode_images([png_paths[0], bad], num_workers=num_workers)
    assert str(bad) in str(e.value)
    with pytest.raises(ImageReadError, match="missing.png"):
        model.encode_images([tmp_path / "missing.png"], num_workers=num_workers)


def test_bad_array_is_reported_with_its_position(model):
    with pytest.raises(ImageReadError, match=r"images\[1\]"):
        model.encode_images([grey_images(1)[0], np.zeros((3, 4, 5, 6), np.float32)])
    with pytest.raises(ImageReadError, match=r"images\[0\].*\(3, 32, 32\)"):
        model.encode_images([torch.zeros(3, 16, 16)])


def test_single_image_inputs(model, png_paths):
    a = grey_images(1)[0]
    np.testing.assert_allclose(model.encode_images(a), model.encode_images([a]), atol=1e-6)
    np.testing.assert_allclose(model.encode_images(torch.from_numpy(a)), model.encode_images([a]), atol=1e-6)
    np.testing.assert_allclose(model.encode_images(str(png_paths[0])), model.encode_images(png_paths[:1]), atol=1e-6)
    np.testing.assert_allclose(model.encode_texts(TEXTS[0]), model.encode_texts(TEXTS[:1]), atol=1e-6)


# ---- preprocessing -------------------------------------------------------------------------------------------
def test_transform_is_picklable_and_normalises():
    t = GreyImageTransform(16, mean=(0.5,) * 3, std=(0.25,) * 3)
    t2 = pickle.loads(pickle.dumps(t))
    a = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    out = t2(a)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, t(a))
    # a square image of the target size is only normalised, grey copied to the three channels
    want = torch.from_numpy((a - 0.5) / 0.25)
    for c in range(3):
        torch.testing.assert_close(out[c], want)


def test_transform_keeps_the_whole_image():
    t = GreyImageTransform(32, mean=(0.0,) * 3, std=(1.0,) * 3)
    tall = np.zeros((128, 64), np.float32)
    tall[:8] = 1.0  # bright apex band
    tall[-8:] = 1.0  # bright base band
    out = t(tall)[0]
    # longest side -> 32, short side 16 centred with 8 px of black padding each side
    assert out[:, :8].abs().max() == 0 and out[:, 24:].abs().max() == 0
    assert out[0, 8:24].min() > 0.9 and out[-1, 8:24].min() > 0.9  # neither band was cropped away
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(tall)[None, None], size=(32, 16), mode="bilinear", antialias=True, align_corners=False
    )[0, 0]
    torch.testing.assert_close(out[:, 8:24], ref.clamp(0, 1))
    wide = t(np.ones((10, 40), np.float32))[0]
    assert wide[:12].abs().max() == 0 and wide[20:].abs().max() == 0 and wide[12:20].min() > 0.99


def test_transform_rejects_bad_arrays():
    t = GreyImageTransform(16)
    with pytest.raises(ValueError, match="HxW"):
        t(np.zeros((0, 5), np.float32))
    rgb = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    torch.testing.assert_close(t(rgb), t(rgb.mean(axis=-1)))


# ---- cxr-tiny on real radiographs ----------------------------------------------------------------------------
@pytest.mark.realdata
def test_cxr_tiny_embeds_real_covid_images(shared_data):
    import pandas as pd

    meta = pd.read_csv(shared_data / "covid-cxr" / "metadata.csv")
    paths = [shared_data / "covid-cxr" / f / n for f, n in zip(meta["folder"], meta["filename"], strict=True)][:16]
    model = load_model("cxr-tiny", device="cpu")
    emb = model.encode_images(paths, batch_size=8, num_workers=2)
    check_embeddings(emb, 16, 256)
    assert np.abs(emb - emb[0]).max(axis=1)[1:].min() > 1e-4  # sixteen different radiographs, sixteen vectors
    np.testing.assert_allclose(model.encode_images(paths[:4], batch_size=3), emb[:4], atol=1e-5)
