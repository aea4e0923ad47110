"""The trainable box detector (generation/heads/detector.py, detector_train.py) on synthetic radiographs with one bright
square each: it learns to find the square better than the image-free prior, saves and reloads to identical
predictions, and its augmentation never flips sides."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from generation.evaluation.metrics import localisation_accuracy, map50
from generation.heads.detector import Detector, DetectorConfig, letterbox
from generation.training.detector_train import Augment, DetectorTrainConfig, answer_threshold, train_detector
from retrieval.errors import ModelLoadError

SIZE = 64


def _square_manifest(folder, n_train: int = 32, n_val: int = 8, n_test: int = 12, seed: int = 0) -> pd.DataFrame:
    """Noisy grey images (96 x 128, not square: the letterbox must map boxes back) with one bright square at a
    random place; its box is the `Nodule` label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_val + n_test):
        h, w = 96, 128
        img = rng.normal(0.3, 0.05, (h, w))
        side = int(rng.integers(28, 44))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        img[y : y + side, x : x + side] = 0.9
        path = folder / f"im{i}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        box = {"label": "Nodule", "x1": x / w, "y1": y / h, "x2": (x + side) / w, "y2": (y + side) / h}
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        rows.append({"image_id": f"im{i}", "image_path": str(path), "split": split, "boxes": [box]})
    return pd.DataFrame(rows)


def _prior(df: pd.DataFrame) -> dict:
    """The image-free answer: the mean training box."""
    boxes = [b for bs in df.loc[df["split"] == "train", "boxes"] for b in bs]
    return {"label": "Nodule", "score": 1.0} | {
        k: float(np.mean([b[k] for b in boxes])) for k in ("x1", "y1", "x2", "y2")
    }


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("det")
    df = _square_manifest(folder)
    torch.set_num_threads(1)
    cfg = DetectorTrainConfig(size=SIZE, epochs=8, batch_size=4, lr=5e-3, views=1, patience=8, fpn_channels=32)
    info = train_detector(df, folder / "det", cfg, progress=False)
    return df, folder / "det", info


def test_detector_finds_the_square_better_than_the_prior(trained):
    df, out, info = trained
    det = Detector.load(out)
    test = df[df["split"] == "test"]
    truth = list(test["boxes"])
    preds = det.predict([_read(p) for p in test["image_path"]])
    prior = [[_prior(df)] for _ in truth]
    det_map, prior_map = map50(truth, preds), map50(truth, prior)
    assert det_map > prior_map + 0.5, (det_map, prior_map, info["history"])
    answers = [det.answer(p) for p in preds]
    assert localisation_accuracy(truth, answers)["acc@0.3"] > localisation_accuracy(truth, prior)["acc@0.3"] + 0.5
    assert all(b["label"] == "Nodule" and 0 <= b["x1"] < b["x2"] <= 1 for p in preds for b in p)
    assert info["epochs_run"] >= 1 and info["best_val_map50"] == max(h["val_map50"] for h in info["history"])


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    df, out, _ = trained
    images = [_read(p) for p in df.loc[df["split"] == "test", "image_path"][:4]]
    first = Detector.load(out)
    first.save(tmp_path / "again")
    assert Detector.load(tmp_path / "again").predict(images) == first.predict(images)
    assert Detector.load(tmp_path / "again").cfg == first.cfg


def test_load_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="not a detector folder"):
        Detector.load(tmp_path)
    Detector.create(DetectorConfig(["A"], size=SIZE), weights=None).save(tmp_path / "d")
    (tmp_path / "d" / "detector.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="cannot load"):
        Detector.load(tmp_path / "d")


def test_augmentation_never_flips_a_left_box_right():
    size = 64
    img = torch.full((1, size, size), 0.2)
    img[0, 20:30, 6:18] = 0.9  # a bright box on the image's left
    box = torch.tensor([[6.0, 20.0, 18.0, 30.0]])
    aug = Augment(size)
    assert not any("Flip" in type(t).__name__ for t in aug.geometry.transforms)
    torch.manual_seed(0)
    for _ in range(50):
        out, boxes, labels = aug(img, box, torch.tensor([0]))
        assert len(boxes) == 1 and labels.tolist() == [0]
        assert (boxes[0, 0] + boxes[0, 2]) / 2 < size / 2  # the box stays left ...
        cols = (out[0] > out[0].mean() + 0.2).float().sum(0)
        assert (cols * torch.arange(size)).sum() / cols.sum() < size / 2  # ... and so does the bright patch
        inside = out[0, int(boxes[0, 1]) + 2 : int(boxes[0, 3]) - 1, int(boxes[0, 0]) + 2 : int(boxes[0, 2]) - 1]
        assert inside.mean() > out[0].mean()  # the moved box still covers the patch


def test_letterbox_maps_boxes_back_to_the_original_image():
    image = np.zeros((50, 100), dtype=np.float32)
    _, frame = letterbox(image, 64)
    box = {"x1": 0.1, "y1": 0.2, "x2": 0.6, "y2": 0.9}
    back = frame.from_square(frame.to_square([box]))[0]
    np.testing.assert_allclose(back, [0.1, 0.2, 0.6, 0.9], atol=1e-5)
    assert frame.to_square([box])[0, 1] >= 16  # the 50-px side is padded: y moves down by the top margin


def test_answer_threshold_lists_as_many_boxes_as_the_truth():
    dets = [[{"score": s} for s in (0.9, 0.5, 0.1)], [{"score": 0.7}]]
    assert answer_threshold(dets, 2) == 0.7
    assert answer_threshold(dets, 10) == 0.1
    assert answer_threshold([[]], 3) == 1.0


def test_cli_refuses_a_bad_size_in_one_line(tmp_path, capsys):
    from cli.main import main

    assert main(["vlm", "detector", "-m", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "d"), "--size", "100"]) == 2
    err = capsys.readouterr().err
    assert "--size must be a multiple of 32" in err and "Traceback" not in err


def test_a_detector_in_the_vlm_folder_answers_identify_and_ground(trained, tmp_path):
    """image_answer.detector_answer: with `VLM/detector/` the box answers are the detector's (its threshold, its
    ranked detections for mAP); a phrase it has no class for, another task, or no detector: the VLM's answer.
    An untrained detector at 128 px answering one image (as `cxr generate` does) is enough to test the wiring."""
    from generation.writing.generate import DETECTOR_DIR, Generator
    from generation.writing.image_answer import detector_answer

    df, _, _ = trained
    vlm = tmp_path / "vlm"
    torch.manual_seed(0)
    cfg = DetectorConfig(labels=["Nodule"], size=128, min_score=0.0, answer_threshold=0.0)
    Detector.create(cfg, weights=None).save(vlm / DETECTOR_DIR)
    det = Detector.load(vlm / DETECTOR_DIR)
    generator = Generator.__new__(Generator)  # only its vlm_dir: the detector property reads nothing else
    generator.vlm_dir = vlm
    assert generator.detector is generator.detector and generator.detector.cfg == det.cfg  # loaded once
    image = _read(df.loc[df["split"] == "test", "image_path"].iloc[0])
    head = {"task": "identify", "text": "", "boxes": [], "source": "box head"}
    got = detector_answer(head, det, image, "identify", None)
    assert got["source"] == "detector" and got["detections"] == det.predict([image])[0]
    assert got["boxes"] == det.answer(got["detections"]) and got["boxes"], got
    grounded = detector_answer({**head, "task": "ground"}, det, image, "ground", "nodule")
    assert grounded["source"] == "detector" and grounded["boxes"]
    assert all(b["label"] == "Nodule" for b in grounded["boxes"])
    unknown = {**head, "task": "ground"}
    assert detector_answer(unknown, det, image, "ground", "right lung") is unknown
    assert detector_answer(head, None, image, "identify", None) is head
    bare = Generator.__new__(Generator)
    bare.vlm_dir = tmp_path / "none"
    assert bare.detector is None  # a VLM folder without a detector answers boxes from its box head
    report = {**head, "task": "report"}
    assert detector_answer(report, det, image, "report", None) is report
