"""Report -> findings: each positive mention of a `rules.FINDING_RULES` pattern becomes a `Finding` with the side,
zone and severity words nearest to it (negation and uncertainty through `retrieval.labels.mention_status`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from retrieval.data.phantom import rules
from retrieval.labels import NO_FINDING, label_report, mention_status
from retrieval.study_text import clean_sentences


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


_UPPER = {"apex", "apices", "apical", "biapical", "upper", "suprahilar"}
_MID = {"mid", "middle", "midlung", "perihilar", "hilar", "hilum", "central", "infrahilar"}


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
    if word in _UPPER:
        return "upper"
    if word in _MID or word.startswith("lingula"):
        return "mid"
    return "lower"


def _finding_at(name: str, covers: tuple[str, ...], sentence: str, start: int, end: int) -> Finding:
    """The finding that the mention `sentence[start:end]` of rule `name` describes."""
    side = _side(_nearest(rules.SIDE_RE, sentence, start, end))
    if name == "Edema" and side is None:
        side = "bilateral"
    zone = _zone(_nearest(rules.ZONE_RE, sentence, start, end))
    if _nearest(rules.BIBASAL_RE, sentence, start, end):
        zone = "lower"
    if _nearest(rules.BIAPICAL_RE, sentence, start, end):
        zone = "upper"
    severity = next((value for rx, value in rules.SEVERITY if _nearest(rx, sentence, start, end, window=30)), 1.0)
    return Finding(name, side, zone, severity, sentence[start:end], covers)


def parse_findings(text: str) -> tuple[list[Finding], list[str]]:
    """Renderable findings named positively in `text`, and names of positive findings that cannot be drawn.

    Each rule fires at most once per (name, side); negated or uncertain mentions ("no effusion", "cannot
    exclude pneumonia") are skipped through `retrieval.labels.mention_status`."""
    found: dict[tuple[str, str | None], Finding] = {}
    extra: list[str] = []
    for sentence in clean_sentences(text):
        claimed: list[tuple[int, int]] = []
        for name, rx, covers in rules.RULE_RE:
            for m in rx.finditer(sentence):
                if any(a < m.end() and m.start() < b for a, b in claimed):
                    continue  # e.g. "calcified granuloma" already taken, not also a nodule
                if mention_status(sentence, m.start(), m.end()) != "positive":
                    continue
                claimed.append((m.start(), m.end()))
                finding = _finding_at(name, covers, sentence, m.start(), m.end())
                # whole-chest findings are drawn once; local ones once per side
                found.setdefault((name, None if name in rules.WHOLE_CHEST else finding.side), finding)
        for m in rules.UNRENDERED_RE.finditer(sentence):
            if mention_status(sentence, m.start(), m.end()) == "positive" and m.group(0) not in extra:
                extra.append(m.group(0))
    findings = list(found.values())
    covered = {c for f in findings for c in f.covers}
    for label in label_report(text or ""):
        if label != NO_FINDING and label not in covered and label not in extra:
            extra.append(label)
    return findings, extra
