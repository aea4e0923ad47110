"""The phantom's reading rules: which words name a drawable finding, which name a finding it cannot draw, and the
words for side, zone and severity near a mention (declarative lists; `parse.py` applies them)."""

from __future__ import annotations

import re

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
RULE_RE = [(name, re.compile(rx), covers) for name, rx, covers in FINDING_RULES]
# Positive mentions of these are reported as `unrendered` (no drawing for them).
UNRENDERED_RE = re.compile(
    r"kyphos\w*|osteopeni\w*|demineraliz\w*|pectus\w*|bronchiectasis|lymphadenopathy|adenopathy|pneumoperitoneum|"
    r"free air|subcutaneous emphysema|pneumomediastinum|mastectomy|breast implant\w*|arthritis|arthropathy|"
    r"bullae|bulla|bleb\w*|\bcyst(?:s|ic)?\b|pericardial effusion|azygos lobe|foreign bod\w*|"
    r"hilar (?:prominence|enlargement)"
)
# Findings that change the whole chest (drawn once whatever the side words say).
WHOLE_CHEST = {
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
SIDE_RE = re.compile(r"\b(?:right|left|bilateral\w*|both|bibasi\w*|bibasal|biapical\w*|bilat)\b")
ZONE_RE = re.compile(
    r"\b(?:apex|apices|apical|biapical|upper|mid|middle|midlung|lingula\w*|perihilar|hilar|hilum|central|"
    r"lower|base|bases|basilar|basal|bibasilar|bibasal|retrocardiac|costophrenic|infrahilar|suprahilar)\b"
)
SEVERITY = [
    (
        re.compile(
            r"\b(?:trace|tiny|minimal|small|mild\w*|subtle|slight\w*|subsegmental|borderline|linear|"
            r"plate-?like|discoid)\b"
        ),
        0.65,
    ),
    (re.compile(r"\b(?:moderate\w*|medium)\b"), 1.0),
    (
        re.compile(r"\b(?:large|severe\w*|marked\w*|extensive|massive|significant\w*|dense|lobar|moderate to large)\b"),
        1.45,
    ),
]
# Words that put a mention in both lower zones or both apices, whatever the nearest zone word says.
BIBASAL_RE = re.compile(r"\b(?:bibasi\w*|bibasal)\b")
BIAPICAL_RE = re.compile(r"\bbiapical\b")
