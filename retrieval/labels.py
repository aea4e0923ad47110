"""Label vocabulary (CheXpert-14 + Tuberculosis) and a rule-based, negation-aware report labeler."""

from __future__ import annotations

LABELS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "Tuberculosis",
]
NO_FINDING = "No Finding"


def is_abnormal(labels: list[str]) -> bool:
    """True when any label other than `No Finding` is present."""
    return any(label != NO_FINDING for label in labels)
