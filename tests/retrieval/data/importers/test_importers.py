"""Importers: every kind on tiny fixtures written here; covid-cxr and yolo on the real ../shared/data."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrieval.data.importers import import_source
from retrieval.data.importers.common import map_finding, map_label, normalize_view
from retrieval.data.importers.mimic_cxr import parse_sections
from retrieval.data.importers.yolo import _parse_simple_yaml, read_yaml
from retrieval.data.manifest_check import summarize_manifest, validate_manifest
from retrieval.errors import ImportError_, UsageError
from retrieval.labels import label_report


def _png(path: Path, w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (h, w), dtype=np.uint8)).save(path)
    return path


def _patients_in_one_split(df: pd.DataFrame) -> bool:
    return bool((df.groupby("patient_id")["split"].nunique() == 1).all())


# --------------------------------------------------------------------------------------------- name mapping


def test_label_and_finding_mapping():
    assert map_label("Active Tuberculosis") == "Tuberculosis"
    assert map_label("Obsolete Pulmonary TB") == "Tuberculosis"
    assert map_label("pleural_effusion") == "Pleural Effusion"
    assert map_label("CARDIOMEGALY") == "Cardiomegaly"
    assert map_label("Right Lung") is None and map_label("") is None
    assert map_finding("Pneumonia/Viral/COVID-19") == ["Pneumonia"]
    assert map_finding("COVID-19, ARDS") == ["Edema", "Pneumonia"]
    assert map_finding("Tuberculosis") == ["Tuberculosis"]
    assert map_finding("No Finding") == ["No Finding"]
    assert map_finding("todo") == [] and map_finding("Unknown") == []
    assert [normalize_view(v) for v in ("ll", "AP Supine", "pa", None)] == ["LATERAL", "AP SUPINE", "PA", ""]


def test_unknown_kind_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown import kind"):
        import_source("dicomdir", tmp_path)


# --------------------------------------------------------------------------------------------- iu-xray


def _open_i_xml(n: int, findings: str, impression: str, images: list[str], mesh: list[str]) -> str:
    parts = [f'<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>']
    parts.append('<AbstractText Label="INDICATION">cough</AbstractText>')
    if findings:
        parts.append(f'<AbstractText Label="FINDINGS">{findings}</AbstractText>')
    if impression:
        parts.append(f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>')
    parts.append("</Abstract></Article></MedlineCitation><MeSH>")
    parts += [f"<major>{m}</major>" for m in mesh] + ["<automatic>not manual</automatic></MeSH>"]
    parts += [f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in images]
    return "".join(parts) + "</eCitation>"


@pytest.fixture
def iu_folder(tmp_path) -> Path:
    xml = tmp_path / "reports"
    xml.mkdir()
    (xml / "1.xml").write_text(
        _open_i_xml(1, "The heart is enlarged.", "Small right pleural effusion.", ["CXR1_1_IM-0001-3001",
                    "CXR1_1_IM-0001-4001"], ["Cardiomegaly/mild", "Pleural Effusion/right"])
    )  # fmt: skip
    (xml / "2.xml").write_text(_open_i_xml(2, "", "No acute cardiopulmonary abnormality.", ["CXR2_IM-0652-1001"], []))
    (xml / "3.xml").write_text(_open_i_xml(3, "", "", ["CXR3_IM-0001-1001"], []))  # no text: skipped
    (xml / "4.xml").write_text(_open_i_xml(4, "Clear lungs.", "", [], []))  # no image: skipped
    (xml / "5.xml").write_text("<eCitation><uId id='CXR5'")  # broken XML: skipped
    return xml


def test_iu_xray_from_folder_without_images(iu_folder):
    df = import_source("iu-xray", iu_folder)
    assert df["image_id"].tolist() == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]
    assert df["study_id"].tolist() == ["CXR1", "CXR1", "CXR2"] and df["patient_id"].tolist() == ["CXR1"] * 2 + ["CXR2"]
    first = df.iloc[0]
    assert first["findings"] == "The heart is enlarged." and first["impression"] == "Small right pleural effusion."
    assert first["report"] == "The heart is enlarged. Small right pleural effusion."
    assert list(first["mesh"]) == ["Cardiomegaly/mild", "Pleural Effusion/right"]
    assert [list(v) for v in df["labels"]] == [label_report(r) for r in df["report"]]
    assert list(first["labels"]) == ["Cardiomegaly", "Pleural Effusion"] and list(df.iloc[2]["labels"]) == [
        "No Finding"
    ]
    assert (df["image_path"] == "").all() and (df["source"] == "iu-xray").all()
    assert _patients_in_one_split(df) and validate_manifest(df) == []
    problems = "\n".join(df.attrs["import_problems"])
    assert "CXR3: report has no FINDINGS" in problems and "CXR4: report references no image" in problems
    assert "5.xml" in problems
    assert any("image_path is empty for all 3 images" in n for n in df.attrs["import_notes"])


def test_iu_xray_from_tgz_with_image_folder(iu_folder, tmp_path):
    archive = tmp_path / "reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for xml in sorted(iu_folder.glob("*.xml")):
            tar.add(xml, arcname=f"ecgen-radiology/{xml.name}")
    images = tmp_path / "png"
    _png(images / "CXR1_1_IM-0001-3001.png")
    _png(images / "sub" / "CXR1_IM-0001-4001.png")  # the short spelling (no '_1_' infix) is found too
    df = import_source("iu-xray", archive, images=images)
    assert df["image_id"].tolist() == [
        "CXR1_1_IM-0001-3001",
        "CXR1_1_IM-0001-4001",
    ]  # CXR2's image is missing
    assert df["image_path"].tolist() == [
        str((images / "CXR1_1_IM-0001-3001.png").resolve()),
        str((images / "sub" / "CXR1_IM-0001-4001.png").resolve()),
    ]
    assert any("CXR2_IM-0652-1001 not found" in p for p in df.attrs["import_problems"])
    assert validate_manifest(df, check_files=True) == []


@pytest.mark.slow
def test_iu_xray_builtin_counts_match_the_archive():
    from retrieval.data.importers.iu_xray import builtin_reports_path

    expected_images = expected_reports = 0
    with tarfile.open(builtin_reports_path()) as tar:  # naive reference: regexes over the raw XML
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            text = tar.extractfile(member).read().decode()
            images = re.findall(r'<parentImage id="', text)
            has_text = re.search(r'Label="(FINDINGS|IMPRESSION)">\s*\S', text)
            if images and has_text:
                expected_images += len(images)
                expected_reports += 1
    df = import_source("iu-xray", "builtin")
    s = summarize_manifest(df)
    assert (s["images"], s["studies"]) == (expected_images, expected_reports)
    assert s["images"] > 7000 and s["labels"]["No Finding"] > 1000
    assert s["views"].get("PA", 0) > 3000 and s["views"].get("LATERAL", 0) > 500
    assert _patients_in_one_split(df) and validate_manifest(df) == []


# --------------------------------------------------------------------------------------------- mimic-cxr

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 The heart is enlarged.  There is a small left
 pleural effusion.

 IMPRESSION:

 Cardiomegaly and small effusion.
"""


def test_parse_mimic_sections():
    s = parse_sections(REPORT)
    assert s["FINDINGS"] == "The heart is enlarged. There is a small left pleural effusion."
    assert s["IMPRESSION"] == "Cardiomegaly and small effusion." and s["INDICATION"] == "___F with cough"


@pytest.fixture
def mimic_folder(tmp_path) -> Path:
    root = tmp_path / "mimic"
    rows = [  # dicom_id, subject, study, view
        ("d1", "10000032", "50000001", "PA"),
        ("d2", "10000032", "50000001", "LATERAL"),
        ("d3", "10000032", "50000002", "AP"),
        ("d4", "11000001", "50000003", "PA"),
        ("d5", "11000001", "50000004", "PA"),  # image file missing: skipped
        ("d6", "11000001", "50000005", "PA"),  # report missing: skipped
    ]
    root.mkdir()
    pd.DataFrame(rows, columns=["dicom_id", "subject_id", "study_id", "ViewPosition"]).to_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False
    )
    pd.DataFrame(
        [(d, st, su, "validate" if su == "11000001" else "train") for d, su, st, _ in rows],
        columns=["dicom_id", "study_id", "subject_id", "split"],
    ).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    pd.DataFrame(
        {
            "subject_id": ["10000032", "10000032", "11000001"],
            "study_id": ["50000001", "50000002", "50000004"],
            "Cardiomegaly": [1.0, None, None],
            "Pleural Effusion": [-1.0, 0.0, None],
            "Edema": [0.0, None, None],
            "No Finding": [None, 1.0, 1.0],
        }
    ).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    for d, su, st, _ in rows:
        folder = root / "files" / f"p{su[:2]}" / f"p{su}"
        folder.mkdir(parents=True, exist_ok=True)
        if st != "50000005":
            (folder / f"s{st}.txt").write_text(REPORT if st != "50000003" else " FINDINGS: Right lower lobe pneumonia.")
        if d != "d5":
            _png(folder / f"s{st}" / f"{d}.jpg")
    return root


def test_mimic_cxr(mimic_folder):
    df = import_source("mimic-cxr", mimic_folder)
    assert df["image_id"].tolist() == ["d1", "d2", "d3", "d4"]
    assert df["patient_id"].tolist() == ["p10000032"] * 3 + ["p11000001"]
    assert df["study_id"].tolist() == ["s50000001", "s50000001", "s50000002", "s50000003"]
    assert df["view"].tolist() == ["PA", "LATERAL", "AP", "PA"]
    assert df["split"].tolist() == ["train", "train", "train", "val"]  # "validate" -> val
    # CheXpert: 1.0 and -1.0 (uncertain) positive, 0/blank negative; s50000003 is not in the file: rules
    assert list(df.iloc[0]["labels"]) == ["Cardiomegaly", "Pleural Effusion"]
    assert list(df.iloc[2]["labels"]) == ["No Finding"]
    assert list(df.iloc[3]["labels"]) == label_report("Right lower lobe pneumonia.") == ["Pneumonia"]
    assert df.iloc[0]["report"] == (
        "The heart is enlarged. There is a small left pleural effusion. Cardiomegaly and small effusion."
    )
    problems = "\n".join(df.attrs["import_problems"])
    assert "d5: image" in problems and "d6: report" in problems
    assert validate_manifest(df, check_files=True) == []


def test_mimic_without_split_file_or_images(mimic_folder, tmp_path):
    (mimic_folder / "mimic-cxr-2.0.0-split.csv").unlink()
    df = import_source("mimic-cxr", mimic_folder, images=tmp_path / "nowhere", seed=3)
    assert len(df) == 5 and (df["image_path"] == "").all()  # d5 kept: no image tree to check against
    assert set(df["split"]) <= {"train", "val", "test"} and _patients_in_one_split(df)
    with pytest.raises(ImportError_, match="metadata"):
        import_source("mimic-cxr", tmp_path)


# --------------------------------------------------------------------------------------------- covid-cxr


@pytest.fixture
def covid_folder(tmp_path) -> Path:
    root = tmp_path / "covid"
    for name, (w, h) in {"a.jpg": (100, 80), "b.png": (50, 50), "c.jpg": (60, 40)}.items():
        _png(root / "images" / name, w, h)
    meta = pd.DataFrame(
        {
            "patientid": ["1", "1", "2", "3", "4"],
            "offset": ["0", "0", "", "", "2"],
            "finding": [
                "Pneumonia/Viral/COVID-19",
                "Pneumonia/Viral/COVID-19",
                "todo",
                "Tuberculosis",
                "No Finding",
            ],
            "view": ["PA", "L", "AP Supine", "PA", "PA"],
            "modality": ["X-ray", "X-ray", "X-ray", "CT", "X-ray"],
            "folder": ["images"] * 5,
            "filename": ["a.jpg", "b.png", "c.jpg", "ct.jpg", "gone.jpg"],
            "clinical_notes": ["Fever and cough.", "Fever and cough.", "", "", ""],
        }
    )
    meta.to_csv(root / "metadata.csv", index=False)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "c.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 8, 40, 60]},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [55, 8, 50, 60],
            },  # overhangs the edge: clipped
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},  # no image size: reported
        ],
        "categories": [{"id": 1, "name": "Right Lung"}, {"id": 2, "name": "Left Lung"}],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "lung_boxes_coco.json").write_text(json.dumps(coco))
    return root


def test_covid_cxr(covid_folder):
    df = import_source("covid-cxr", covid_folder)
    assert df["image_id"].tolist() == ["a.jpg", "b.png", "c.jpg"]
    assert df["study_id"].tolist() == ["1-d0", "1-d0", "2-c"]
    assert df["view"].tolist() == ["PA", "LATERAL", "AP SUPINE"]
    assert [list(v) for v in df["labels"]] == [["Pneumonia"], ["Pneumonia"], []]
    assert df["report"].tolist() == ["Fever and cough.", "Fever and cough.", ""]
    boxes = list(df.iloc[0]["boxes"])
    assert boxes[0] == {"label": "Right Lung", "x1": 0.1, "y1": 0.1, "x2": 0.5, "y2": 0.85}
    assert boxes[1] == {"label": "Left Lung", "x1": 0.55, "y1": 0.1, "x2": 1.0, "y2": 0.85}
    problems = "\n".join(df.attrs["import_problems"])
    assert "'CT' is not an X-ray" in problems and "gone.jpg" in problems and "annotation 3" in problems
    assert _patients_in_one_split(df) and validate_manifest(df, check_files=True) == []


def test_covid_cxr_errors(tmp_path):
    with pytest.raises(ImportError_, match="metadata.csv not found"):
        import_source("covid-cxr", tmp_path)
    (tmp_path / "metadata.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ImportError_, match="missing column"):
        import_source("covid-cxr", tmp_path)


# --------------------------------------------------------------------------------------------- yolo

DATA_YAML = """# YOLO layout
path: .
images: images
labels: labels
nc: 3
names:
  0: Active Tuberculosis
  1: Obsolete Pulmonary TB
  2: Right Lung
"""


def test_tiny_yaml_parser_matches_pyyaml():
    import yaml

    assert _parse_simple_yaml(DATA_YAML) == yaml.safe_load(DATA_YAML)
    listed = "names: [cat, 'dog']\nnc: 2\ntrain: images/train\n"
    assert _parse_simple_yaml(listed) == yaml.safe_load(listed)
    block = "names:\n  - Active Tuberculosis\n  - Nodule\n"
    assert _parse_simple_yaml(block) == yaml.safe_load(block)


@pytest.fixture
def yolo_folder(tmp_path) -> Path:
    root = tmp_path / "yolo"
    root.mkdir()
    (root / "data.yaml").write_text(DATA_YAML)
    for name in ("train/t1.png", "train/t2.jpg", "val/v1.png", "x1.png"):
        _png(root / "images" / name)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "t1.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.25 0.5 0.3 0.8\n")
    (root / "labels" / "train" / "t2.txt").write_text("1 0.95 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\nbad line\n")
    (root / "labels" / "x1.txt").write_text("")
    return root


def test_yolo(yolo_folder):
    df = import_source("yolo", yolo_folder)
    assert df["image_id"].tolist() == ["train/t1", "train/t2", "val/v1", "x1"]
    assert df["patient_id"].tolist() == df["study_id"].tolist() == df["image_id"].tolist()
    assert df["split"].tolist()[:3] == ["train", "train", "val"]  # the folder names are the splits
    b = list(df.iloc[0]["boxes"])
    ref = [("Active Tuberculosis", 0.5, 0.5, 0.2, 0.4), ("Right Lung", 0.25, 0.5, 0.3, 0.8)]
    for box, (label, cx, cy, w, h) in zip(b, ref, strict=True):
        assert box["label"] == label
        got = [box[k] for k in ("x1", "y1", "x2", "y2")]
        np.testing.assert_allclose(got, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    assert list(df.iloc[0]["labels"]) == ["Tuberculosis"]  # 'Right Lung' is anatomy: box only
    assert list(df.iloc[1]["boxes"])[0]["x2"] == 1.0  # clipped at the edge
    assert [list(v) for v in df["labels"]][2:] == [[], []]
    problems = "\n".join(df.attrs["import_problems"])
    assert "t2.txt line 2: class 7" in problems and "t2.txt line 3" in problems and "v1.png: no label file" in problems
    assert any("empty label file" in n for n in df.attrs["import_notes"])
    assert validate_manifest(df, check_files=True) == []
    with pytest.raises(ImportError_, match="data.yaml"):
        import_source("yolo", yolo_folder / "images")


def test_read_yaml_reports_bad_yaml(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [a, b\n")
    with pytest.raises(ImportError_, match="not valid YAML"):
        read_yaml(tmp_path / "data.yaml")


# --------------------------------------------------------------------------------------------- coco


def test_coco(tmp_path):
    _png(tmp_path / "images" / "p1.png", 200, 100)
    _png(tmp_path / "images" / "p2.png", 200, 100)
    coco = {
        "images": [
            {"id": 1, "file_name": "p1.png", "width": 200, "height": 100, "patient_id": "P9"},
            {"id": 2, "file_name": "p2.png", "width": 200, "height": 100, "patient_id": "P9"},
            {"id": 3, "file_name": "missing.png", "width": 200, "height": 100},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [20, 10, 100, 50]},
            {"id": 2, "image_id": 2, "category_id": 4, "bbox": [0, 0, 0, 10]},  # empty: reported
        ],
        "categories": [{"id": 3, "name": "Nodule/Mass"}, {"id": 4, "name": "Heart"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(coco))
    df = import_source("coco", tmp_path / "annotations" / "train.json")
    assert df["image_id"].tolist() == ["p1", "p2"] and df["patient_id"].tolist() == ["P9", "P9"]
    assert list(df.iloc[0]["boxes"]) == [{"label": "Nodule/Mass", "x1": 0.1, "y1": 0.1, "x2": 0.6, "y2": 0.6}]
    assert list(df.iloc[0]["labels"]) == ["Lung Lesion"] and list(df.iloc[1]["labels"]) == []
    problems = "\n".join(df.attrs["import_problems"])
    assert "missing.png: file not found" in problems and "annotation 2" in problems
    assert any("Heart" in n for n in df.attrs["import_notes"])
    assert _patients_in_one_split(df) and validate_manifest(df, check_files=True) == []
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ImportError_, match="not a readable COCO"):
        import_source("coco", tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------- csv


def test_csv_with_column_map(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    pd.DataFrame(
        {
            "file": ["img/a.png", "img/b.png", ""],
            "pid": ["P1", "P2", "P3"],
            "text": ["The heart is enlarged.", "No acute cardiopulmonary abnormality.", "x"],
            "Projection": ["pa", "ll", "pa"],
        }
    ).to_csv(tmp_path / "mine.csv", index=False)
    df = import_source(
        "csv", tmp_path / "mine.csv", column_map="image_path=file,patient_id=pid,report=text,view=Projection"
    )
    assert df["image_id"].tolist() == ["img/a", "img/b"] and df["patient_id"].tolist() == ["P1", "P2"]
    assert df["image_path"].tolist() == [str((tmp_path / "img" / n).resolve()) for n in ("a.png", "b.png")]
    assert [list(v) for v in df["labels"]] == [["Cardiomegaly"], ["No Finding"]]  # from the rule labeler
    assert df["view"].tolist() == ["PA", "LATERAL"] and "empty image_path" in df.attrs["import_problems"][0]
    assert validate_manifest(df, check_files=True) == []
    with pytest.raises(ImportError_, match="not a manifest column"):
        import_source("csv", tmp_path / "mine.csv", column_map="picture=file")
    with pytest.raises(ImportError_, match="not in the file"):
        import_source("csv", tmp_path / "mine.csv", column_map="image_path=nope")


def test_csv_keeps_given_labels_and_splits(tmp_path):
    _png(tmp_path / "a.png")
    csv = "image_id,study_id,patient_id,image_path,labels,split,boxes\n"
    box = '"[{""label"": ""Edema"", ""x1"": 0, ""y1"": 0, ""x2"": 1, ""y2"": 1}]"'
    csv += f"a,s,p,a.png,Edema|Cardiomegaly,test,{box}\n"
    (tmp_path / "m.csv").write_text(csv)
    df = import_source("csv", tmp_path / "m.csv")
    assert list(df.iloc[0]["labels"]) == ["Edema", "Cardiomegaly"] and df.iloc[0]["split"] == "test"
    assert list(df.iloc[0]["boxes"])[0]["x2"] == 1.0


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_covid_cxr(shared_data):
    df = import_source("covid-cxr", shared_data / "covid-cxr")
    s = summarize_manifest(df)
    assert (s["images"], s["patients"], s["boxes"]) == (296, 190, 592)
    assert s["boxes_per_label"] == {"Right Lung": 296, "Left Lung": 296}
    meta = pd.read_csv(shared_data / "covid-cxr" / "metadata.csv", dtype=str, keep_default_na=False)
    pneumonias = {"COVID-19", "COVID-19, ARDS", "SARS", "Pneumocystis", "Pneumonia", "Streptococcus",
                  "E.Coli", "Legionella", "Lipoid", "Klebsiella", "Chlamydophila", "Influenza"}  # fmt: skip
    assert s["labels"]["Pneumonia"] == meta["finding"].isin(pneumonias).sum()
    assert s["labels"]["No Finding"] == (meta["finding"] == "No Finding").sum()
    assert df.attrs["import_problems"] == []
    assert _patients_in_one_split(df) and validate_manifest(df, check_files=True) == []


@pytest.mark.realdata
def test_real_yolo_tbx11k(shared_data):
    df = import_source("yolo", shared_data / "tbx11k-tb")
    s = summarize_manifest(df)
    lines = [ln for p in (shared_data / "tbx11k-tb" / "labels").glob("*.txt") for ln in p.read_text().splitlines()]
    assert s["images"] == 600 and s["boxes"] == len([ln for ln in lines if ln.strip()])
    empty = [p for p in (shared_data / "tbx11k-tb" / "labels").glob("*.txt") if not p.read_text().strip()]
    assert s["labels"] == {"Tuberculosis": 600 - len(empty)}
    assert validate_manifest(df, check_files=True) == []
    assert set(df["split"]) == {"train", "val", "test"}
