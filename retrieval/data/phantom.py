"""Synthetic PA chest radiographs ("phantoms") that agree with a report: anatomy with patient variation plus
the findings the report names, drawn where the report places them, with a box for every finding and organ.

It is a demo and a test bed, not a simulator: densities are summed in a 2-D attenuation map (soft tissue,
air-filled lungs, heart, mediastinum, spine, ribs, clavicles, diaphragm), then exposed (1 - exp(-k * density)),
blurred and given noise. Geometry is drawn on a normalised grid that is rotated per patient, so boxes are read
off the drawn masks in image coordinates and stay exact. The patient's right is on the image's left (PA view).

`parse_findings(text)` turns a report into `Finding`s (negation-aware through `retrieval.labels`; side, zone and
severity from the words near each mention); `render_findings(findings, size, seed)` draws them;
`render_phantom(text, size, seed)` does both. Anatomy and noise depend only on the seed, each finding has its own
random stream, so removing a finding changes only the pixels it drew.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from retrieval.labels import _SENT_SPLIT, _clean, label_report, mention_status

VERSION = 2

# ------------------------------------------------------------------------------------------------------------
# Report -> findings
# ------------------------------------------------------------------------------------------------------------
# (finding name used as box label, mention regex, CheXpert labels the drawing stands for)
FINDING_RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "Cardiomegaly",
        r"cardiomegaly|enlarge\w* (?:of )?(?:the )?(?:heart|cardiac)|(?:heart|cardiac)(?: silhouette| "
        r"shadow| size)? (?:is |are |appears |remains )?(?:\w+ly )?(?:enlarged|large)",
        ("Cardiomegaly",),
    ),
    (
        "Widened Mediastinum",
        r"widen\w* (?:of )?(?:the )?mediastin\w*|mediastin\w* (?:is |appears )?(?:\w+ly )?"
        r"(?:widen|enlarg|prominen)\w*|(?:paratracheal|mediastinal) (?:fullness|prominence)",
        ("Enlarged Cardiomediastinum",),
    ),
    (
        "Pleural Effusion",
        r"effusion|blunt\w* (?:of )?(?:the )?(?:\w+ )?(?:costophrenic|cp)|pleural fluid",
        ("Pleural Effusion",),
    ),
    ("Pneumothorax", r"pneumothora\w*", ("Pneumothorax",)),
    (
        "Consolidation",
        r"consolidat\w*|pneumonia|airspace disease|air space disease|air-space disease|infiltrat\w*",
        ("Consolidation", "Pneumonia", "Lung Opacity"),
    ),
    (
        "Opacity",
        r"(?<!nodular )(?<!calcified )(?<!interstitial )opacit\w*|(?<!nodular )(?<!soft tissue )"
        r"densit(?:y|ies)|haziness",
        ("Lung Opacity",),
    ),
    (
        "Calcified Granuloma",
        r"granuloma\w*|calcified (?:nodul\w*|densit\w*)|calcific densit\w*|nodular calcification",
        (),
    ),
    ("Nodule", r"(?<!calcified )nodul\w*|nodular (?:opacit|densit)\w*", ("Lung Lesion",)),
    ("Mass", r"\bmass(?:es)?\b|neoplasm|tumou?r|carcinoma|malignan\w*", ("Lung Lesion",)),
    ("Cavity", r"cavit\w*", ("Lung Lesion", "Tuberculosis")),
    ("Atelectasis", r"atelecta\w*|collapse", ("Atelectasis",)),
    ("Edema", r"edema|congesti\w*|heart failure|\bchf\b|kerley", ("Edema",)),
    (
        "Interstitial Markings",
        r"interstitial (?:marking|pattern|opacit|prominence|disease|lung disease)\w*|"
        r"reticul\w*|(?:prominent|increased|coarse\w*|chronic) interstitial",
        ("Lung Opacity",),
    ),
    ("Scarring", r"(?<!pleural )scar(?:s|ring)?\b|fibros\w*|fibrotic|cicatri\w*", ("Lung Opacity",)),
    (
        "Pleural Thickening",
        r"pleural (?:thickening|scar\w*|plaque\w*|calcification)|thicken\w* (?:of )?(?:the )?"
        r"(?:\w+ )?pleura|apical (?:pleural )?cap\w*|pleuroparenchymal|pleural-parenchymal",
        ("Pleural Other",),
    ),
    (
        "Emphysema",
        r"emphysema|hyperinflat\w*|hyperexpan\w*|hyperaerat\w*|hyperlucen\w*|\bcopd\b|chronic obstructive"
        r"|flatten\w* (?:of )?(?:the )?(?:\w+ )?(?:hemi)?diaphragm|(?:hemi)?diaphragms? (?:are |is )?flattened|"
        r"large lung volumes|hyperdistention",
        (),
    ),
    (
        "Low Lung Volumes",
        r"low lung volumes?|hypoinflat\w*|hypoventilat\w*|poor inspiration|shallow inspiration|"
        r"low volumes",
        (),
    ),
    (
        "Elevated Hemidiaphragm",
        r"elevat\w* (?:of )?(?:the )?(?:right |left )?(?:hemi)?diaphragm|(?:hemi)?diaphragm (?:is )?"
        r"(?:\w+ly )?elevated|eventration",
        (),
    ),
    ("Pacemaker", r"pacemaker|pacer|defibrillator|\baicd\b|\bicd\b|generator", ("Support Devices",)),
    (
        "Central Line",
        r"catheter|central line|venous line|\bpicc\b|port-?a-?cath|\bport\b|dialysis|"
        r"\btip (?:at|in|overl\w*|project\w*|terminat\w*|approximat\w*|near)",
        ("Support Devices",),
    ),
    ("Endotracheal Tube", r"endotracheal|\bet tube|tracheostomy", ("Support Devices",)),
    (
        "Enteric Tube",
        r"nasogastric|\bng tube|\bog tube|feeding tube|enteric tube|dobhoff",
        ("Support Devices",),
    ),
    ("Sternotomy Wires", r"sternotomy|sternal wires|\bcabg\b|bypass graft", ("Support Devices",)),
    ("Surgical Clips", r"clips|staples", ("Support Devices",)),
    ("Rib Fracture", r"fractur\w*|\bfx\b", ("Fracture",)),
    ("Scoliosis", r"scolio\w*|dextroscolio\w*|levoscolio\w*|curvature of the (?:thoracic )?spine", ()),
    ("Degenerative Spine", r"degenerat\w*|spondylo\w*|osteophyt\w*|\bdish\b|spurring", ()),
    ("Hiatal Hernia", r"hiatal hernia|hiatus hernia|hernia", ()),
    ("Tortuous Aorta", r"tortu\w*|ectatic|unfold\w*|aortic (?:ectasia|aneurysm)", ()),
    (
        "Aortic Calcification",
        r"atheroscl\w*|calcifi\w* (?:of )?(?:the )?(?:\w+ )?aort\w*|aortic (?:arch )?calcif\w*",
        (),
    ),
    (
        "Calcified Lymph Nodes",
        r"calcified (?:\w+ )?(?:lymph nodes?|nodes|hilar|mediastinal)|calcified hil\w*",
        (),
    ),
]
_RULE_RE = [(name, re.compile(rx), covers) for name, rx, covers in FINDING_RULES]
# Positive mentions of these are reported as `unrendered` (no drawing for them).
_UNRENDERED_RE = re.compile(
    r"kyphos\w*|osteopeni\w*|demineraliz\w*|pectus\w*|bronchiectasis|lymphadenopathy|adenopathy|pneumoperitoneum|"
    r"free air|subcutaneous emphysema|pneumomediastinum|mastectomy|breast implant\w*|arthritis|arthropathy|"
    r"bullae|bulla|bleb\w*|\bcyst(?:s|ic)?\b|pericardial effusion|azygos lobe|foreign bod\w*|"
    r"hilar (?:prominence|enlargement)"
)
# Findings that change the whole chest (drawn once whatever the side words say).
_GLOBAL = {
    "Cardiomegaly",
    "Widened Mediastinum",
    "Emphysema",
    "Low Lung Volumes",
    "Edema",
    "Scoliosis",
    "Degenerative Spine",
    "Hiatal Hernia",
    "Tortuous Aorta",
    "Aortic Calcification",
    "Sternotomy Wires",
    "Endotracheal Tube",
    "Enteric Tube",
}
_SIDE_RE = re.compile(r"\b(?:right|left|bilateral\w*|both|bibasi\w*|bibasal|biapical\w*|bilat)\b")
_ZONE_RE = re.compile(
    r"\b(?:apex|apices|apical|biapical|upper|mid|middle|midlung|lingula\w*|perihilar|hilar|hilum|central|"
    r"lower|base|bases|basilar|basal|bibasilar|bibasal|retrocardiac|costophrenic|infrahilar|suprahilar)\b"
)
_SEVERITY = [
    (
        re.compile(
            r"\b(?:trace|tiny|minimal|small|mild\w*|subtle|slight\w*|subsegmental|borderline|linear|"
            r"plate-?like|discoid)\b"
        ),
        0.65,
    ),
    (re.compile(r"\b(?:moderate\w*|medium)\b"), 1.0),
    (
        re.compile(
            r"\b(?:large|severe\w*|marked\w*|extensive|massive|significant\w*|dense|lobar|moderate to large)\b"
        ),
        1.45,
    ),
]


@dataclass
class Finding:
    """One renderable finding: name (the box label), side ('right'|'left'|'bilateral'|None), zone
    ('upper'|'mid'|'lower'|None), severity (0.65 small ... 1.45 large), the words it came from and the CheXpert
    labels it stands for."""

    name: str
    side: str | None = None
    zone: str | None = None
    severity: float = 1.0
    text: str = ""
    covers: tuple[str, ...] = ()


@dataclass
class Phantom:
    """A rendered study: image float32 HxW in [0, 1], finding boxes, anatomy boxes, findings, unrendered names."""

    image: np.ndarray
    finding_boxes: list[dict[str, Any]]
    anatomy_boxes: list[dict[str, Any]]
    findings: list[Finding]
    unrendered: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> list[dict[str, Any]]:
        """Finding boxes then anatomy boxes (anatomy labels carry the `anatomy:` prefix)."""
        return self.finding_boxes + [{**b, "label": f"anatomy:{b['label']}"} for b in self.anatomy_boxes]


def _nearest(rx: re.Pattern[str], sentence: str, start: int, end: int, window: int = 60) -> str | None:
    """The match of `rx` nearest to the mention [start, end) within `window` chars (before counts a bit closer)."""
    best, best_d = None, 10**9
    for m in rx.finditer(sentence):
        if m.end() <= start:
            d = start - m.end()
        elif m.start() >= end:
            d = int((m.start() - end) * 1.3)
        else:
            d = 0
        if d < best_d and d <= window:
            best, best_d = m.group(0), d
    return best


def _side(word: str | None) -> str | None:
    if not word:
        return None
    if word.startswith(("bi", "both")):
        return "bilateral"
    return word


def _zone(word: str | None) -> str | None:
    if not word:
        return None
    if word in {"apex", "apices", "apical", "biapical", "upper", "suprahilar"}:
        return "upper"
    if word in {
        "mid",
        "middle",
        "midlung",
        "perihilar",
        "hilar",
        "hilum",
        "central",
        "infrahilar",
    } or word.startswith("lingula"):
        return "mid"
    return "lower"


def parse_findings(text: str) -> tuple[list[Finding], list[str]]:
    """Renderable findings named positively in `text`, and names of positive findings that cannot be drawn.

    Each rule fires at most once per (name, side); negated or uncertain mentions ("no effusion", "cannot
    exclude pneumonia") are skipped through `retrieval.labels.mention_status`."""
    found: dict[tuple[str, str | None], Finding] = {}
    extra: list[str] = []
    for sentence in _SENT_SPLIT.split(_clean(text or "")):
        claimed: list[tuple[int, int]] = []
        for name, rx, covers in _RULE_RE:
            for m in rx.finditer(sentence):
                if any(a < m.end() and m.start() < b for a, b in claimed):
                    continue  # e.g. "calcified granuloma" already taken, not also a nodule
                if mention_status(sentence, m.start(), m.end()) != "positive":
                    continue
                claimed.append((m.start(), m.end()))
                side = _side(_nearest(_SIDE_RE, sentence, m.start(), m.end()))
                if name == "Edema" and side is None:
                    side = "bilateral"
                zone = _zone(_nearest(_ZONE_RE, sentence, m.start(), m.end()))
                if zone is None and side is None:
                    w = _nearest(_ZONE_RE, sentence, m.start(), m.end(), window=20)
                    zone = _zone(w)
                if _nearest(re.compile(r"\b(?:bibasi\w*|bibasal)\b"), sentence, m.start(), m.end()):
                    zone = "lower"
                if _nearest(re.compile(r"\bbiapical\b"), sentence, m.start(), m.end()):
                    zone = "upper"
                sev = 1.0
                for srx, value in _SEVERITY:
                    if _nearest(srx, sentence, m.start(), m.end(), window=30):
                        sev = value
                        break
                # whole-chest findings are drawn once; local ones once per side
                key = (name, None if name in _GLOBAL else side)
                if key not in found:
                    found[key] = Finding(name, side, zone, sev, sentence[m.start() : m.end()], covers)
        for m in _UNRENDERED_RE.finditer(sentence):
            if mention_status(sentence, m.start(), m.end()) == "positive" and m.group(0) not in extra:
                extra.append(m.group(0))
    findings = list(found.values())
    covered = {c for f in findings for c in f.covers}
    for label in label_report(text or ""):
        if label != "No Finding" and label not in covered and label not in extra:
            extra.append(label)
    return findings, extra


# ------------------------------------------------------------------------------------------------------------
# Drawing helpers (all on the normalised, rotated grid X, Y in [0, 1])
# ------------------------------------------------------------------------------------------------------------
def _sig(z: np.ndarray, eps: float) -> np.ndarray:
    """A soft step from 0 to 1 over about 2*eps around z = 0 (a clipped ramp: cheap, and smooth enough)."""
    return np.clip(z * (0.5 / eps) + 0.5, 0.0, 1.0)


def _window(X: np.ndarray, Y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Pixel slices covering the world rectangle [x0, x1] x [y0, y1] (plus one pixel)."""
    col, row = _to_pixels(X, Y, np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    S0, S1 = X.shape
    r0, r1 = max(0, int(np.floor(row.min())) - 1), min(S0, int(np.ceil(row.max())) + 2)
    c0, c1 = max(0, int(np.floor(col.min())) - 1), min(S1, int(np.ceil(col.max())) + 2)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _ellipse(X, Y, cx, cy, ax, ay, eps, angle=0.0) -> np.ndarray:
    """A filled ellipse with soft edges (computed only inside its bounding box)."""
    out = np.zeros(X.shape, np.float32)
    r = max(ax, ay) * 1.05 + 2 * eps
    rs, cs = _window(X, Y, cx - r, cx + r, cy - r, cy + r)
    x, y = X[rs, cs] - np.float32(cx), Y[rs, cs] - np.float32(cy)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = (x * c + y * s) * np.float32(1 / ax)
    v = (y * c - x * s) * np.float32(1 / ay)
    out[rs, cs] = _sig(1.0 - np.sqrt(u * u + v * v), eps / max(min(ax, ay), 1e-3))
    return out


def _to_pixels(X: np.ndarray, Y: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (col, row) of world points: X and Y are affine in the pixel grid, so invert that 2x2 map."""
    x0, y0 = float(X[0, 0]), float(Y[0, 0])
    a, b = float(X[0, 1]) - x0, float(X[1, 0]) - x0
    c, d = float(Y[0, 1]) - y0, float(Y[1, 0]) - y0
    det = a * d - b * c
    dx, dy = np.asarray(xs, np.float64) - x0, np.asarray(ys, np.float64) - y0
    return (d * dx - b * dy) / det, (a * dy - c * dx) / det


def _dist(X: np.ndarray, Y: np.ndarray, polylines: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Distance (world units) from every pixel to the nearest of the polylines (one Euclidean distance
    transform for all of them, inside their bounding box plus a margin; 10 elsewhere)."""
    S0, S1 = X.shape
    px = float(np.hypot(X[0, 1] - X[0, 0], Y[0, 1] - Y[0, 0]))  # world units per pixel
    out = np.full((S0, S1), 10.0, np.float32)
    if not polylines:
        return out
    lens = [len(p[0]) for p in polylines]
    col, row = _to_pixels(
        X, Y, np.concatenate([p[0] for p in polylines]), np.concatenate([p[1] for p in polylines])
    )
    cc_all, rr_all = [], []
    start = 0
    for n in lens:
        c, r = col[start : start + n], row[start : start + n]
        start += n
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(c), np.diff(r)))])
        t = np.arange(0.0, arc[-1] + 0.34, 0.34)  # a third of a pixel apart
        cc_all.append(np.interp(t, arc, c))
        rr_all.append(np.interp(t, arc, r))
    cc = np.rint(np.concatenate(cc_all)).astype(int)
    rr = np.rint(np.concatenate(rr_all)).astype(int)
    ok = (cc >= 0) & (cc < S1) & (rr >= 0) & (rr < S0)
    if not ok.any():
        return out
    cc, rr = cc[ok], rr[ok]
    margin = max(8, S0 // 16)
    r0, r1 = max(0, rr.min() - margin), min(S0, rr.max() + margin + 1)
    c0, c1 = max(0, cc.min() - margin), min(S1, cc.max() + margin + 1)
    canvas = np.ones((r1 - r0, c1 - c0), bool)
    canvas[rr - r0, cc - c0] = False
    out[r0:r1, c0:c1] = ndimage.distance_transform_edt(canvas) * px
    return out


def _band(X, Y, xs: np.ndarray, ys: np.ndarray, width: float, eps: float) -> np.ndarray:
    """A smooth band of half-width `width` (world units) around the polyline (xs, ys)."""
    return _sig(width - _dist(X, Y, [(np.asarray(xs), np.asarray(ys))]), eps)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance noise smooth on the scale `sigma` pixels (drawn coarse, then resized up: fast)."""
    from PIL import Image

    step = max(1, int(sigma))
    small = (shape[0] // step + 2, shape[1] // step + 2)
    n = rng.standard_normal(small).astype(np.float32)
    if step > 1:
        n = ndimage.gaussian_filter(n, 0.7)
        up = np.asarray(
            Image.fromarray(n, mode="F").resize((small[1] * step, small[0] * step), Image.BILINEAR)
        )
        up = up[: shape[0], : shape[1]]
    else:
        up = ndimage.gaussian_filter(n, sigma)[: shape[0], : shape[1]]
    return (up - up.mean()) / (up.std() + 1e-6)


def _box_from(mask: np.ndarray, thr: float = 0.25) -> tuple[float, float, float, float] | None:
    """Normalised bounding box of mask > thr * max (None when empty)."""
    m = float(mask.max())
    if m <= 1e-6:
        return None
    on = mask > thr * m
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    if len(rows) == 0:
        return None
    h, w = mask.shape
    return (float(cols[0] / w), float(rows[0] / h), float((cols[-1] + 1) / w), float((rows[-1] + 1) / h))


@dataclass
class _Anatomy:
    """Per-patient geometry (normalised units) and the drawn anatomy masks."""

    m: float  # midline x
    ya: float  # lung apex y
    yb: tuple[float, float]  # costophrenic angle y (right, left)
    dome: tuple[float, float]  # dome height (right, left)
    wl: float  # lateral half width of a lung
    heart: tuple[float, float, float, float]  # cx, cy, ax, ay
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    lung_center: tuple[float, float] = (0.0, 0.0)


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------
def _stream(seed: int, *keys: Any) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys])


def render_findings(findings: list[Finding], size: int = 256, seed: int = 0) -> Phantom:
    """Draw a phantom with the given findings. Anatomy and noise depend only on `seed`."""
    rng = _stream(seed, "anatomy")
    S = int(size)
    eps = 2.0 / S
    # ---- patient variation and the rotated grid ------------------------------------------------------------
    angle = float(np.deg2rad(rng.normal(0, 2.0)))
    shift = [float(v) for v in rng.normal(0, 0.012, 2)]
    zoom = rng.uniform(0.93, 1.05)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    u, v = (xx + 0.5) / S - 0.5 - shift[0], (yy + 0.5) / S - 0.5 - shift[1]
    c, s = np.cos(angle), np.sin(angle)
    X = ((c * u + s * v) / zoom + 0.5).astype(np.float32)
    Y = ((-s * u + c * v) / zoom + 0.5).astype(np.float32)
    habitus = rng.uniform(0.85, 1.2)  # soft-tissue thickness
    m = 0.5
    hyper = next((f.severity for f in findings if f.name == "Emphysema"), 0.0)
    low = next((f.severity for f in findings if f.name == "Low Lung Volumes"), 0.0)
    ya = rng.uniform(0.08, 0.11) - 0.015 * (hyper > 0)
    base = rng.uniform(0.78, 0.83) + 0.05 * min(hyper, 1.2) - 0.06 * min(low, 1.2)
    yb = (base - rng.uniform(0.0, 0.02), base + rng.uniform(0.0, 0.015))
    dome_h = rng.uniform(0.06, 0.09) * (0.35 if hyper else 1.0)
    dome = [dome_h + 0.01, dome_h]
    for f in findings:
        if f.name == "Elevated Hemidiaphragm":
            i = 1 if f.side == "left" else 0
            dome[i] += 0.05 * f.severity
    wl = rng.uniform(0.165, 0.19) * (1.06 if hyper else 1.0)
    cm = next((f.severity for f in findings if f.name == "Cardiomegaly"), 0.0)
    heart_ax = rng.uniform(0.15, 0.17) * (1.0 + 0.28 * cm)
    heart_ay = rng.uniform(0.13, 0.145) * (1.0 + 0.1 * cm)
    heart = (m + 0.045 + 0.5 * (heart_ax - 0.16), base - 0.095 - 0.02 * (hyper > 0), heart_ax, heart_ay)
    A = _Anatomy(m, ya, yb, (dome[0], dome[1]), wl, heart)

    D = np.zeros((S, S), np.float32)
    # ---- body outline and soft tissue ----------------------------------------------------------------------
    shoulder = 0.1 + rng.uniform(-0.015, 0.015)
    bw = 0.30 + 0.16 * _sig(Y - shoulder, 0.03) + 0.02 * habitus
    neck = 0.09 + 0.0 * Y
    bw = np.where(Y < shoulder - 0.02, np.maximum(neck, bw), bw)
    body = _sig(bw - np.abs(X - m), eps * 2)
    D += (0.62 + 0.2 * habitus) * body
    # upper arms / humeral heads at the upper corners
    for sg in (-1, 1):
        D += 0.3 * _ellipse(X, Y, m + sg * 0.44, 0.15, 0.045, 0.05, eps) * body
    # ---- lungs ---------------------------------------------------------------------------------------------
    lungs = {}
    for side, sg in (("right", -1), ("left", 1)):
        i = 0 if side == "right" else 1
        xc = m + sg * (0.03 + wl)  # lung centre x
        t = np.clip((Y - ya) / (yb[i] - ya), 0, 1)
        lat_w = wl * (0.25 + 0.78 * t**0.42)  # lateral edge distance from centre
        med_w = wl * (0.3 + 0.72 * t**0.55)
        if side == "left":
            med_w = med_w - 0.03 * _sig(Y - (heart[1] - heart[3]), 0.02)
        dx = (X - xc) * sg  # positive towards the lateral side
        lateral_ok = _sig(lat_w - dx, eps)
        medial_ok = _sig(med_w + dx, eps)
        # diaphragm dome: highest near the lung centre, at yb at the lateral wall (the costophrenic angle)
        r = np.clip(((X - (xc - sg * 0.02)) / (wl * 1.05)) ** 2, 0, 1)
        y_d = yb[i] - dome[i] * (1 - r) ** 0.8
        below_top = _sig(Y - ya, eps)
        above_diaphragm = _sig(y_d - Y, eps)
        lungs[side] = lateral_ok * medial_ok * below_top * above_diaphragm
        A.masks[f"{side}_ydiaphragm"] = y_d
    lung = np.clip(lungs["right"] + lungs["left"], 0, 1)
    # liver and spleen under the domes: as dense as the heart, so the heart merges into them
    y_dia = np.where(X < m, A.masks["right_ydiaphragm"], A.masks["left_ydiaphragm"])
    D += 0.5 * _sig(Y - y_dia - 0.005, 0.02) * body
    # vascular markings: tapered branches from each hilum
    vr = _stream(seed, "vessels")
    paths = []
    hila = {}
    for side, sg in (("right", -1), ("left", 1)):
        hx, hy = m + sg * 0.1, heart[1] - heart[3] * 0.9
        hila[side] = (hx, hy)
        for _ in range(26):
            ang = vr.uniform(-0.5 * np.pi, 0.6 * np.pi)  # from up-lateral to down-lateral
            r0 = vr.uniform(0.02, 0.06)
            length = vr.uniform(0.1, 0.3)
            ts = np.linspace(0, 1, 7)
            bend = vr.normal(0, 0.04)
            xs = hx + sg * np.cos(ang) * (r0 + length * ts) + bend * ts**2 * sg
            ys = hy - np.sin(ang) * (r0 + length * ts) * 0.9
            paths.append((xs, ys))
    # vessels taper: thick and dense near the hila, fading toward the periphery
    rh = np.minimum(*(np.hypot(X - hx, Y - hy) for hx, hy in hila.values()))
    vessels = 0.7 * _sig(0.003 + 0.005 * np.exp(-rh / 0.12) - _dist(X, Y, paths), eps) * np.exp(-rh / 0.35)
    vessels = ndimage.gaussian_filter(vessels, 0.6)
    A.masks["vessels"] = vessels
    A.masks["lung"] = lung
    A.masks.update({f"{k}_lung": v for k, v in lungs.items()})
    # ---- mediastinum, trachea, heart, aorta ----------------------------------------------------------------
    widen = next((f.severity for f in findings if f.name == "Widened Mediastinum"), 0.0)
    med_half = 0.055 + 0.03 * widen + 0.012 * _sig(Y - 0.3, 0.05)
    mediast = _sig(med_half - np.abs(X - m - 0.005), eps) * _sig(Y - 0.07, 0.01) * _sig(heart[1] - Y, 0.02)
    hx, hy, hax, hay = heart
    heart_m = _ellipse(X, Y, hx, hy, hax, hay, eps, angle=-0.45) * _sig(
        np.minimum(A.masks["right_ydiaphragm"], A.masks["left_ydiaphragm"]) + 0.01 - Y, 0.008
    )
    tort = next((f.severity for f in findings if f.name == "Tortuous Aorta"), 0.0)
    knob = (m + 0.06 + 0.02 * tort, heart[1] - heart[3] - 0.1, 0.032 + 0.01 * tort)
    aorta = _ellipse(X, Y, knob[0], knob[1], knob[2], knob[2] * 1.1, eps)
    desc = _sig(0.025 - np.abs(X - (knob[0] - 0.01)), eps) * _sig(Y - knob[1], 0.01) * _sig(hy - Y, 0.02)
    D += 0.62 * np.clip(mediast + heart_m + aorta + 0.5 * desc, 0, 1)
    trachea = (
        _sig(0.016 - np.abs(X - m + 0.004 * (Y - 0.2)), eps) * _sig(Y - 0.02, 0.01) * _sig(0.33 - Y, 0.01)
    )
    bronchi = sum(
        _band(X, Y, np.array([m, m + sg * 0.07]), np.array([0.33, 0.4]), 0.01, eps) for sg in (-1, 1)
    )
    D -= 0.25 * np.clip(trachea + bronchi, 0, 1)
    A.masks.update(mediastinum=mediast, heart=heart_m, aorta=aorta, trachea=trachea)
    # ---- lungs are air: subtract density, add markings -----------------------------------------------------
    # lungs are thickest (darkest) in the mid zones, lighter toward the bases and the apices
    t_lung = np.clip((Y - ya) / (base - ya), 0, 1)
    thick = 0.85 + 0.15 * np.sin(np.pi * np.clip(t_lung * 1.1, 0, 1))
    D -= (0.5 + 0.08 * (hyper > 0)) * thick * lung * (1 - 0.6 * heart_m) * (1 - 0.7 * mediast)
    lung_vessels = vessels * lung * (0.45 if hyper else 1.0) * (1.25 if low else 1.0)
    # ---- spine, ribs, clavicles ----------------------------------------------------------------------------
    scol = next((f for f in findings if f.name == "Scoliosis"), None)
    sx = m + (
        0.035 * scol.severity * np.sin(np.pi * (Y - 0.1) / 0.75) * (1 if scol.side != "left" else -1)
        if scol
        else 0.0
    )
    spine = _sig(0.034 - np.abs(X - sx), eps) * _sig(Y - 0.02, 0.01)
    discs = 0.75 + 0.25 * np.cos(2 * np.pi * (Y - ya) / 0.05) ** 8  # vertebral bodies with disc spaces
    pedicles = sum(_sig(0.006 - np.abs(X - sx - sg * 0.022), eps) for sg in (-1, 1)) * (discs > 0.9)
    D += 0.22 * spine * discs + 0.1 * pedicles * spine
    A.masks["spine"] = spine
    n_ribs = 10
    rib_gap = (max(yb) - ya) / (n_ribs - 0.3)
    rib_len = wl * 2.15
    rib_paths: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for side, sg in (("right", -1), ("left", 1)):
        for k in range(n_ribs):
            uu = np.linspace(0.03, 0.03 + rib_len, 12)
            w = uu / rib_len
            rib_paths[(side, k)] = (
                m + sg * uu,
                ya + 0.01 + k * rib_gap - 0.035 * np.sin(np.pi * w) + 0.075 * w**2,
            )
    # All posterior ribs share one shape y = y0_k + g(u), u = |x - spine|, so the distance to the nearest rib is
    # closed-form: the vertical offset to the nearest y0_k, scaled by the curve's slope (no distance transform).
    uX = np.abs(X - sx)
    w = uX / rib_len
    g = -0.035 * np.sin(np.pi * w) + 0.075 * w**2
    dg = (-0.035 * np.pi * np.cos(np.pi * w) + 0.15 * w) / rib_len
    phase = (Y - g - ya - 0.01) / rib_gap
    kk = np.clip(np.rint(phase), 0, n_ribs - 1)
    d = np.abs(phase - kk) * rib_gap / np.sqrt(1 + dg * dg)
    along = _sig(uX - 0.03, eps) * _sig(0.03 + rib_len - uX, 0.01)
    th = 0.0105
    ribs = (0.08 * _sig(th - d, eps) + 0.06 * _sig(th * 0.3 - np.abs(d - th * 0.8), eps)) * along
    # anterior ribs (fainter): straight, running down and medially from the lateral wall
    ua0, ua1 = wl * 0.8, wl * 2.1
    slope = 0.12 / (wl * 1.3)
    pa = (Y - (ya + 0.01 + 0.03 + 0.12) - slope * (uX - ua0)) / rib_gap
    ka = np.clip(np.rint(pa), 0, 6)
    da = np.abs(pa - ka) * rib_gap / math.sqrt(1 + slope * slope)
    ribs += 0.04 * _sig(th * 1.1 - da, eps) * _sig(uX - ua0, 0.01) * _sig(ua1 - uX, 0.01)
    ribs *= body
    D += ribs
    A.masks["ribs"] = ribs
    clav = {}
    for side, sg in (("right", -1), ("left", 1)):
        uu = np.linspace(0.035, 0.27, 10)
        cy0 = ya + rng.uniform(0.04, 0.07)
        xs = m + sg * uu
        ys = cy0 - 0.08 * (uu - 0.035) / 0.235 + 0.015 * np.sin(2 * np.pi * uu / 0.235)
        clav[side] = _band(X, Y, xs, ys, 0.011, eps)
        D += 0.25 * clav[side]
    A.masks.update({f"{k}_clavicle": v for k, v in clav.items()})
    # gastric bubble under the left dome
    gx = m + 0.15 + rng.uniform(-0.03, 0.03)
    gy = A.masks["left_ydiaphragm"][min(S - 1, int(yb[1] * S)), min(S - 1, int(gx * S))] + 0.045
    D -= 0.35 * _ellipse(X, Y, gx, gy, 0.045, 0.025, eps) * _sig(Y - gy + 0.005, 0.003)
    # breast shadows for some patients
    if rng.random() < 0.45:
        for sg in (-1, 1):
            D += (
                0.12
                * _ellipse(X, Y, m + sg * 0.24, base - 0.08, 0.13, 0.09, 0.02)
                * _sig(Y - (base - 0.1), 0.02)
            )
    # ---- findings ------------------------------------------------------------------------------------------
    # The display window comes from the anatomy alone, so a finding never changes pixels outside its own area.
    nr = _stream(seed, "noise")
    k = nr.uniform(1.1, 1.5)
    anat = 1.0 - np.exp(-k * np.maximum(D + 0.2 * lung_vessels, 0)[::4, ::4])
    lo, hi = (float(v) for v in np.percentile(anat, [0.5, 99.8]))
    hi = lo + (hi - lo) * 1.15  # headroom: metal and calcium show brighter than the mediastinum
    finding_boxes: list[dict[str, Any]] = []
    for idx, f in enumerate(findings):
        fr = _stream(seed, "finding", f.name, f.side, idx)
        contrib = _draw_finding(f, fr, X, Y, A, lungs, rib_paths, eps, lung_vessels, finding_boxes)
        if contrib is not None:
            D += contrib
    D += 0.2 * lung_vessels
    D = np.maximum(D, 0)
    # ---- exposure, blur, noise -----------------------------------------------------------------------------
    D = D * (1 + 0.05 * _smooth_noise(nr, (S, S), S / 16))
    img = 1.0 - np.exp(-k * D)
    img = ndimage.gaussian_filter(img, 0.7 * S / 256)
    img = img + nr.normal(0, nr.uniform(0.006, 0.02), img.shape).astype(np.float32)
    img = np.clip((img - lo) / max(hi - lo, 1e-3), 0, 1)
    gamma = nr.uniform(0.85, 1.2)
    img = img**gamma
    anatomy_boxes = _anatomy_boxes(A, clav)
    return Phantom(img.astype(np.float32), finding_boxes, anatomy_boxes, list(findings))


def _zone_range(zone: str | None, A: _Anatomy, i: int) -> tuple[float, float]:
    top, bot = A.ya, A.yb[i] - A.dome[i] * 0.4
    h = bot - top
    return {
        "upper": (top + 0.05 * h, top + 0.35 * h),
        "mid": (top + 0.35 * h, top + 0.65 * h),
        "lower": (top + 0.62 * h, bot),
        None: (top + 0.3 * h, top + 0.85 * h),
    }[zone]


def _sides(f: Finding, rng: np.random.Generator, default: str | None = None) -> list[str]:
    if f.side == "bilateral":
        return ["right", "left"]
    if f.side in ("right", "left"):
        return [f.side]
    return [default or ("right" if rng.random() < 0.5 else "left")]


def _add_box(boxes: list[dict[str, Any]], name: str, mask: np.ndarray, thr: float = 0.25) -> None:
    b = _box_from(mask, thr)
    if b is not None and b[2] > b[0] and b[3] > b[1]:
        boxes.append(
            {
                "label": name,
                "x1": round(b[0], 4),
                "y1": round(b[1], 4),
                "x2": round(b[2], 4),
                "y2": round(b[3], 4),
            }
        )


def _point_in_lung(rng, A: _Anatomy, lungs, side: str, zone: str | None, X, Y) -> tuple[float, float]:
    """A random point well inside `side` lung within `zone`."""
    i = 0 if side == "right" else 1
    y0, y1 = _zone_range(zone, A, i)
    mask = lungs[side] > 0.95
    sel = mask & (Y >= y0) & (Y <= y1)
    sel = ndimage.binary_erosion(sel, iterations=max(1, mask.shape[0] // 40))
    ys, xs = np.nonzero(sel)
    if len(xs) == 0:
        ys, xs = np.nonzero(mask)
    j = rng.integers(len(xs))
    return float(X[ys[j], xs[j]]), float(Y[ys[j], xs[j]])


def _draw_finding(f, rng, X, Y, A: _Anatomy, lungs, rib_paths, eps, lung_vessels, boxes) -> np.ndarray | None:
    """Density added by one finding (or None when drawn by geometry); appends its box(es)."""
    S = X.shape[0]
    name = f.name
    out = np.zeros_like(X)
    if name == "Cardiomegaly":
        _add_box(boxes, name, A.masks["heart"], 0.5)
        return None
    if name == "Widened Mediastinum":
        _add_box(boxes, name, A.masks["mediastinum"] * (Y < A.heart[1] - A.heart[3]), 0.5)
        return None
    if name == "Tortuous Aorta":
        _add_box(boxes, name, A.masks["aorta"], 0.5)
        return None
    if name in ("Emphysema", "Low Lung Volumes"):
        _add_box(boxes, name, A.masks["lung"], 0.5)
        return None
    if name == "Elevated Hemidiaphragm":
        for side in _sides(f, rng, "right"):
            band = _sig(0.03 - np.abs(Y - A.masks[f"{side}_ydiaphragm"]), eps) * _sig(
                0.2 - np.abs(X - (0.5 + (0.2 if side == "left" else -0.2))), 0.01
            )
            _add_box(boxes, name, band, 0.5)
        return None
    if name == "Scoliosis":
        _add_box(boxes, name, A.masks["spine"] * (Y > 0.1) * (Y < 0.85), 0.5)
        return None
    if name == "Pleural Effusion":
        for side in _sides(f, rng):
            i = 0 if side == "right" else 1
            sg = -1 if side == "right" else 1
            lung = lungs[side]
            h = 0.06 + 0.1 * f.severity**1.6  # fluid height at the lateral wall
            level = A.yb[i] - h
            xc = 0.5 + sg * (0.03 + A.wl)
            lat = np.clip((X - xc) * sg / A.wl + 1, 0, 2) / 2  # 0 medial .. 1 lateral
            meniscus = level + 0.07 * f.severity * (1 - lat) ** 1.5
            fluid = lung * _sig(Y - meniscus, 0.012) * (0.75 + 0.25 * np.clip((Y - meniscus) / 0.05, 0, 1))
            # blunt the angle: fill the costophrenic recess
            recess = _sig(Y - (A.yb[i] - 0.02 - h * 0.5), 0.01) * _sig(
                0.05 - np.abs((X - xc) * sg - A.wl), 0.01
            )
            fl = np.clip(fluid + 0.6 * recess * (lung > 0.05), 0, 1)
            out += 0.72 * fl
            lung_vessels *= 1 - fl
            _add_box(boxes, name, fl, 0.3)
        return out
    if name == "Pneumothorax":
        for side in _sides(f, rng, "right"):
            i = 0 if side == "right" else 1
            sg = -1 if side == "right" else 1
            lung = lungs[side]
            xc = 0.5 + sg * (0.03 + A.wl)
            gap = 0.03 + 0.05 * f.severity  # lung edge retracts from the chest wall
            t = np.clip((Y - A.ya) / (A.yb[i] - A.ya), 0, 1)
            lat_w = A.wl * (0.25 + 0.78 * t**0.42)
            edge = lat_w - gap * (1.2 - 0.7 * t) - 0.05 * (Y < A.ya + 0.05)
            d = (X - xc) * sg
            space = lung * _sig(d - edge, eps) * _sig(A.yb[i] - 0.1 - Y, 0.03)
            # apex: also retracted downward
            space = np.maximum(space, lung * _sig(A.ya + gap * 1.3 - Y, eps))
            line = (
                lung
                * _sig(0.0035 - np.abs(d - edge), eps * 0.7)
                * (Y < A.yb[i] - 0.1)
                * (Y > A.ya + gap * 1.2)
            )
            out += -0.16 * space + 0.28 * line
            lung_vessels *= 1 - space
            _add_box(boxes, name, space, 0.5)
        return out
    if name in ("Consolidation", "Opacity", "Edema", "Interstitial Markings", "Scarring", "Atelectasis"):
        for side in _sides(f, rng, None if name != "Edema" else "right"):
            lung = lungs[side]
            sg = -1 if side == "right" else 1
            i = 0 if side == "right" else 1
            if name == "Edema":
                hx, hy = 0.5 + sg * 0.14, A.heart[1] - A.heart[3] * 0.7
                haze = np.exp(-(((X - hx) / (0.11 + 0.03 * f.severity)) ** 2 + ((Y - hy) / 0.16) ** 2))
                tex = 0.8 + 0.2 * _smooth_noise(rng, X.shape, S / 80)
                o = lung * haze * tex
                out += 0.4 * (0.7 + 0.3 * f.severity) * o
                w_h = np.clip(o * 1.5, 0, 1)  # vessels go indistinct inside the haze only
                lung_vessels[:] = lung_vessels * (1 - w_h) + ndimage.gaussian_filter(lung_vessels, 1.2) * w_h
                _add_box(boxes, name, o, 0.35)
                continue
            if name == "Interstitial Markings":
                y0, y1 = _zone_range(f.zone or "lower", A, i)
                yc, hh = (y0 + y1) / 2 + 0.02, (y1 - y0) / 2 + 0.04
                zmask = lung * np.exp(-(((Y - yc) / hh) ** 4))
                # the zero crossings of smooth noise form a network of thin curved lines (reticulation)
                n1, n2 = _smooth_noise(rng, X.shape, S / 36), _smooth_noise(rng, X.shape, S / 24)
                ret = np.maximum(np.exp(-((n1 / 0.22) ** 2)), 0.7 * np.exp(-((n2 / 0.2) ** 2)))
                o = zmask * ret
                out += 0.2 * o
                _add_box(boxes, name, zmask, 0.5)
                continue
            cx, cy = _point_in_lung(rng, A, lungs, side, f.zone, X, Y)
            if name == "Scarring" or (name == "Atelectasis" and f.severity < 1.4):
                # linear / plate-like band, roughly horizontal
                L = 0.06 + 0.04 * rng.random() * f.severity
                th = 0.006 if name == "Scarring" else 0.009
                a = rng.normal(0, 0.25)
                xs = np.array([cx - L, cx, cx + L])
                ys = np.array([cy - L * np.sin(a), cy + rng.normal(0, 0.006), cy + L * np.sin(a)])
                o = _band(X, Y, xs, ys, th, eps) * lung
                if name == "Atelectasis" and f.zone in (None, "lower") and rng.random() < 0.5:
                    o = np.maximum(o, _band(X, Y, xs, ys + 0.025, th * 0.8, eps) * lung)
                out += 0.5 * o
                _add_box(boxes, name, o, 0.3)
                continue
            if name == "Atelectasis":  # lobar: a dense wedge with volume loss toward the hilum
                hx, hy = 0.5 + sg * 0.08, A.heart[1] - A.heart[3]
                wedge = np.exp(-(((X - cx) / 0.09) ** 2 + ((Y - cy) / 0.07) ** 2))
                towards = np.exp(-(((X - (cx + hx) / 2) / 0.08) ** 2 + ((Y - (cy + hy) / 2) / 0.05) ** 2))
                o = lung * np.clip(wedge + 0.6 * towards, 0, 1)
                out += 0.5 * o
                _add_box(boxes, name, o, 0.35)
                continue
            # consolidation / opacity: a cluster of soft blobs with texture, air bronchograms when dense
            r = (0.045 if name == "Opacity" else 0.06) * (0.7 + 0.45 * f.severity)
            o = np.zeros_like(X)
            for _ in range(4 + int(3 * f.severity)):
                bx, by = cx + rng.normal(0, r * 0.6), cy + rng.normal(0, r * 0.5)
                o = np.maximum(
                    o,
                    np.exp(
                        -(
                            ((X - bx) / (r * rng.uniform(0.6, 1.1))) ** 2
                            + ((Y - by) / (r * rng.uniform(0.5, 0.9))) ** 2
                        )
                    ),
                )
            tex = np.clip(0.75 + 0.35 * _smooth_noise(rng, X.shape, S / 64), 0, 1.2)
            o = lung * np.clip(o * 1.3, 0, 1) * tex
            if name == "Consolidation" and f.severity >= 1.0:
                br = _band(
                    X,
                    Y,
                    np.array([cx - sg * r, cx + sg * r * 0.8]),
                    np.array([cy - r * 0.2, cy + r * 0.4]),
                    0.004,
                    eps,
                )
                o *= 1 - 0.35 * br
            out += (0.55 if name == "Consolidation" else 0.42) * o
            lung_vessels *= 1 - 0.5 * np.clip(o, 0, 1)
            _add_box(boxes, name, o, 0.3)
        return out
    if name in ("Nodule", "Mass", "Calcified Granuloma", "Cavity"):
        for side in _sides(f, rng):
            cx, cy = _point_in_lung(
                rng, A, lungs, side, f.zone if name != "Cavity" else (f.zone or "upper"), X, Y
            )
            if name == "Nodule":
                rr, dens = 0.016 + 0.006 * f.severity, 0.45
            elif name == "Mass":
                rr, dens = 0.045 + 0.02 * f.severity, 0.5
            elif name == "Cavity":
                rr, dens = 0.04, 0.5
            else:
                rr, dens = max(0.008, 2.3 / S), 1.3
            lob = 1 + (0.12 * _smooth_noise(rng, X.shape, S / 60) if name == "Mass" else 0)
            o = _ellipse(X, Y, cx, cy, rr, rr * rng.uniform(0.85, 1.0), eps) * lob
            if name == "Cavity":
                o = np.clip(
                    o - 0.85 * _ellipse(X, Y, cx + 0.005, cy - 0.004, rr * 0.55, rr * 0.5, eps), 0, None
                )
            out += dens * np.clip(o, 0, 1.3)
            pad = 2.0 / S  # the blur spreads small findings by a pixel or two
            _add_box(boxes, name, _ellipse(X, Y, cx, cy, rr + pad, rr + pad, eps), 0.5)
        return out
    if name == "Calcified Lymph Nodes":
        for side in _sides(f, rng):
            sg = -1 if side == "right" else 1
            hx, hy = 0.5 + sg * 0.085, A.heart[1] - A.heart[3] * 1.05
            o = np.zeros_like(X)
            for _ in range(2 + rng.integers(2)):
                o = np.maximum(
                    o, _ellipse(X, Y, hx + rng.normal(0, 0.012), hy + rng.normal(0, 0.015), 0.009, 0.008, eps)
                )
            out += 1.0 * o
            _add_box(boxes, name, o, 0.4)
        return out
    if name == "Pleural Thickening":
        for side in _sides(f, rng, "right" if rng.random() < 0.5 else "left"):
            i = 0 if side == "right" else 1
            lung = lungs[side]
            inner = ndimage.binary_erosion(lung > 0.5, iterations=max(1, int(0.014 * S)))
            rim = (lung > 0.5) & ~inner
            apical = f.zone == "upper" or "apical" in f.text or f.zone is None
            zone = (
                Y < A.ya + 0.1
                if apical
                else (Y > _zone_range(f.zone, A, i)[0]) & (Y < _zone_range(f.zone, A, i)[1] + 0.1)
            )
            o = ndimage.gaussian_filter((rim & zone).astype(np.float32), 0.8)
            out += 0.45 * o
            _add_box(boxes, name, o, 0.3)
        return out
    if name == "Aortic Calcification":
        aorta = A.masks["aorta"]
        rim = np.clip(aorta - ndimage.minimum_filter(aorta, size=max(3, S // 64)), 0, 1)
        o = rim * (X > 0.5 + 0.04)  # the calcified rim on the outer curve of the knob
        out += 0.9 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Hiatal Hernia":
        hx, hy = 0.5 + 0.02, A.heart[1] + 0.01
        o = _ellipse(X, Y, hx, hy, 0.06 * f.severity, 0.045 * f.severity, eps)
        gas = _ellipse(X, Y, hx, hy, 0.05 * f.severity, 0.036 * f.severity, eps) * _sig(hy - 0.005 - Y, eps)
        wall = np.clip(o - _ellipse(X, Y, hx, hy, 0.052 * f.severity, 0.038 * f.severity, eps), 0, 1)
        out += 0.25 * o + 0.3 * wall - 0.75 * gas  # a retrocardiac gas bubble with an air-fluid level
        _add_box(boxes, name, o, 0.5)
        return out
    if name == "Degenerative Spine":
        o = np.zeros_like(X)
        for _ in range(4 + rng.integers(4)):
            ly = rng.uniform(0.3, 0.8)
            ly = A.ya + round((ly - A.ya) / 0.05) * 0.05 + 0.025  # at a disc space
            for sg in (-1, 1):
                if rng.random() < 0.7:
                    sxm = 0.5
                    xs = np.array([sxm + sg * 0.03, sxm + sg * 0.048])
                    ys = np.array([ly - 0.004, ly + 0.006 * rng.choice([-1, 1])])
                    o = np.maximum(o, _band(X, Y, xs, ys, 0.0045, eps))
        out += 1.4 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Rib Fracture":
        sides = _sides(f, rng)
        for side in sides:
            k = int(rng.integers(3, 8))
            xs, ys = rib_paths[(side, k)]
            j = int(rng.integers(5, 9))
            px, py = xs[j], ys[j]
            # a healing fracture: a bright callus on the rib around a thin lucent fracture line
            on_rib = _band(X, Y, xs, ys, 0.016, eps)
            callus = _ellipse(X, Y, px, py, 0.016, 0.016, eps) * on_rib
            gap = _ellipse(X, Y, px, py, 0.006, 0.02, eps) * _band(X, Y, xs, ys, 0.01, eps)
            out += 0.42 * callus - 0.18 * gap
            _add_box(boxes, name, _ellipse(X, Y, px, py, 0.02, 0.02, eps), 0.5)
        return out
    # ---- support devices: very dense, thin ----------------------------------------------------------------
    if name == "Pacemaker":
        side = "left" if f.side != "right" else "right"
        sg = -1 if side == "right" else 1
        gx, gy = 0.5 + sg * rng.uniform(0.2, 0.26), A.ya + rng.uniform(0.06, 0.1)
        box = _sig(0.03 - np.abs(X - gx), eps) * _sig(0.022 - np.abs(Y - gy), eps)
        hx, hy = A.heart[0], A.heart[1]
        leads = np.zeros_like(X)
        for tgt in ((hx - 0.02, hy + 0.02), (hx + 0.04, hy + 0.06))[: 1 + int(rng.random() < 0.7)]:
            xs = np.array([gx, gx - sg * 0.06, 0.5 - 0.02, 0.5 - 0.03, tgt[0], tgt[0] + 0.01])
            ys = np.array([gy, gy - 0.03, A.ya + 0.12, hy - 0.12, tgt[1] - 0.03, tgt[1]])
            leads = np.maximum(leads, _band(X, Y, xs, ys, 0.0035, eps))
        o = np.clip(box * 1.0 + leads, 0, 1)
        out += 1.6 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Central Line":
        side = "right" if f.side != "left" else "left"
        sg = -1 if side == "right" else 1
        xs = np.array([0.5 + sg * 0.33, 0.5 + sg * 0.2, 0.5 + sg * 0.06, 0.5 + sg * 0.035, 0.5 - 0.025])
        ys = np.array([A.ya + 0.03, A.ya + 0.05, A.ya + 0.08, A.ya + 0.14, A.heart[1] - A.heart[3] - 0.02])
        o = _band(X, Y, xs, ys, 0.004, eps)
        out += 1.2 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Endotracheal Tube":
        xs = np.array([0.5, 0.5, 0.5 - 0.002])
        ys = np.array([0.0, 0.15, 0.27])
        o = _band(X, Y, xs - 0.009, ys, 0.003, eps) + _band(X, Y, xs + 0.009, ys, 0.003, eps)
        out += 1.0 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Enteric Tube":
        gy = A.yb[1] + 0.03
        xs = np.array([0.49, 0.495, 0.5 + 0.01, 0.5 + 0.06, 0.5 + 0.14])
        ys = np.array([0.0, 0.3, 0.6, gy, gy + 0.04])
        o = _band(X, Y, xs, ys, 0.004, eps)
        out += 1.1 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Sternotomy Wires":
        o = np.zeros_like(X)
        top = A.ya + 0.1
        for k in range(5 + int(rng.integers(2))):
            cy = top + k * 0.055
            ring = _ellipse(X, Y, 0.5 + 0.005, cy, 0.012, 0.008, eps) - _ellipse(
                X, Y, 0.5 + 0.005, cy, 0.007, 0.004, eps
            )
            o = np.maximum(o, np.clip(ring, 0, 1))
        out += 3.0 * o
        _add_box(boxes, name, o, 0.3)
        return out
    if name == "Surgical Clips":
        o = np.zeros_like(X)
        side = _sides(f, rng)[0]
        sg = -1 if side == "right" else 1
        cx, cy = 0.5 + sg * rng.uniform(0.08, 0.25), rng.uniform(0.25, 0.8)
        for _ in range(3 + rng.integers(3)):
            px, py = cx + rng.normal(0, 0.02), cy + rng.normal(0, 0.02)
            a = rng.uniform(0, np.pi)
            o = np.maximum(
                o,
                _band(
                    X,
                    Y,
                    np.array([px, px + 0.012 * np.cos(a)]),
                    np.array([py, py + 0.012 * np.sin(a)]),
                    0.003,
                    eps,
                ),
            )
        out += 1.5 * o
        _add_box(boxes, name, o, 0.3)
        return out
    return None


def _anatomy_boxes(A: _Anatomy, clav: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    boxes: list[dict[str, Any]] = []
    _add_box(boxes, "Right Lung", A.masks["right_lung"], 0.5)
    _add_box(boxes, "Left Lung", A.masks["left_lung"], 0.5)
    _add_box(boxes, "Heart", A.masks["heart"], 0.5)
    _add_box(boxes, "Mediastinum", A.masks["mediastinum"], 0.5)
    _add_box(boxes, "Aortic Arch", A.masks["aorta"], 0.5)
    _add_box(boxes, "Trachea", A.masks["trachea"], 0.5)
    _add_box(boxes, "Spine", A.masks["spine"], 0.5)
    _add_box(boxes, "Right Clavicle", clav["right"], 0.5)
    _add_box(boxes, "Left Clavicle", clav["left"], 0.5)
    S = A.masks["lung"].shape[0]
    for side in ("right", "left"):
        lung = A.masks[f"{side}_lung"] > 0.5
        ys, xs = np.nonzero(lung)
        if len(xs) == 0:
            continue
        # the costophrenic angle: the lateral-lowest corner of the lung
        lateral = -xs if side == "right" else xs
        j = np.argmax(ys * 1.0 + 0.6 * lateral)
        cx, cy = xs[j] / S, ys[j] / S
        r = 0.04
        boxes.append(
            {
                "label": f"{side.capitalize()} Costophrenic Angle",
                "x1": round(max(0, cx - r), 4),
                "y1": round(max(0, cy - r * 1.5), 4),
                "x2": round(min(1, cx + r), 4),
                "y2": round(min(1, cy + r * 0.5), 4),
            }
        )
        # the hemidiaphragm: the lung's lower border (lung pixels with no lung below), in the lung's lower half
        floor = lung & ~np.vstack([lung[1:], np.zeros((1, lung.shape[1]), bool)])
        floor[: int((ys.min() + ys.max()) / 2)] = False
        _add_box(boxes, f"{side.capitalize()} Hemidiaphragm", _near(floor).astype(np.float32), 0.5)
    return boxes


def _near(mask: np.ndarray) -> np.ndarray:
    """The mask grown by a few pixels."""
    return ndimage.binary_dilation(mask, iterations=max(1, mask.shape[0] // 64))


def render_phantom(text: str, size: int = 256, seed: int = 0) -> Phantom:
    """A phantom for a report: parse its findings, draw them, list what could not be drawn."""
    findings, unrendered = parse_findings(text)
    ph = render_findings(findings, size=size, seed=seed)
    drawn = {b["label"] for b in ph.finding_boxes}
    ph.unrendered = unrendered + [f.name for f in findings if f.name not in drawn]
    return ph
