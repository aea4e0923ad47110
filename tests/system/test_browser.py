"""The web viewer in a real browser: `cxr serve` (uvicorn, a separate process) over a tiny index, driven by
playwright through Debian's headless Chromium (`apt-get install chromium`; never a downloaded browser build).

Skips, saying why, only where Chromium or playwright is absent; `.ci/run` installs both.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from gen_synth import make_manifest, one_thread, tiny_vlm_config  # noqa: F401 (an autouse fixture)

from benchmarks.serve_common import CHROMIUM_ARGS, start_server, stop_server, wait_js

CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
K = 4
# `cxr serve --archive-url`: the viewer links the studies that have UIDs (all but s1 here) to the archive
ARCHIVE = "http://pacs.invalid/ohif/viewer?StudyInstanceUIDs={study_instance_uid}&acc={accession_number}"
NO_UID_STUDY = "s1"


def with_uids(df):
    """The synthetic manifest with DICOM UIDs on every study but NO_UID_STUDY (an accession with a space and '&',
    which the link must encode)."""
    df = df.copy()
    for col in ("study_instance_uid", "accession_number"):
        df[col] = ""
    for i, sid in enumerate(df["study_id"]):
        if sid != NO_UID_STUDY:
            df.loc[i, "study_instance_uid"] = f"1.2.826.0.1.3680043.8.498.{i + 1}"
            df.loc[i, "accession_number"] = f"A&{i} x"
    return df


if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install chromium), as .ci/run does",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")


def launch(p):
    """Debian's Chromium, headless, with nothing that reaches the network by itself (CHROMIUM_ARGS)."""
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real cxr-tiny model folder, an index over 36 synthetic studies, a tiny VLM, and `cxr serve` over them."""
    from generation.training.train import train_vlm
    from index.build import BuildOptions, build_index
    from retrieval.models import load_model

    root = tmp_path_factory.mktemp("browser")
    df = with_uids(make_manifest(root, n=36))
    model = load_model("cxr-tiny", device="cpu")
    model.save(root / "model")
    build_index(df, model, root / "idx", options=BuildOptions(model_path=root / "model", workers=0, progress=False))
    # report + identify only: in 200 steps (~10 s) this tiny VLM learns to draft the synthetic reports and to
    # draw boxes for the images with findings; with all five tasks it often draws none yet
    cfg = tiny_vlm_config(
        200,
        tasks=["report", "identify"],
        rag_k=3,  # the server's default k: a prompt of the length it was trained on
        task_rule="inverse",  # the settings this tiny run was tuned with (before uniform tasks, balance, aux loss)
        balance=0.0,
        aux_weight=0.0,
    )
    train_vlm(df, root / "vlm", cfg, index_dir=root / "idx", progress=False)
    log, tmp = root / "serve.log", root / "tmp"
    tmp.mkdir()
    args = ["--index", str(root / "idx"), "--vlm", str(root / "vlm"), "--watch-interval", "0"]
    args += ["--archive-url", ARCHIVE]
    proc, url = start_server(args, log, timeout=180, tmp=tmp)
    assert [p.name for p in tmp.iterdir()][0].startswith("cxr-serve-uploads-")
    yield url, root, df
    stop_server(proc)
    # SIGTERM: uvicorn shuts the app down (which closes the service) and the upload folder goes with it
    assert proc.returncode is not None and list(tmp.iterdir()) == [], list(tmp.iterdir())


def image_with_boxes(url: str, root: Path) -> Path:
    """The first synthetic image whose `[identify]` output (through the API) holds a box. The tiny VLM's output
    depends on its 200 training steps; the test checks that the page draws what the server returns, so it asks
    the server first instead of hoping that one fixed image gets a box."""
    import httpx

    for i in range(36):
        path = root / "img" / f"{i}.png"
        files = {"image": (path.name, path.read_bytes(), "image/png")}
        res = httpx.post(url + "/generate", files=files, data={"task": "identify"}, timeout=60).json()
        if res["boxes"]:
            return path
    raise AssertionError("the tiny VLM drew no [identify] box for any of the 36 images")


def test_viewer_search_draft_and_boxes_in_chromium(served, tmp_path):
    url, root, _ = served
    query = image_with_boxes(url, root)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            wait_js(page, "() => document.querySelector('#info').textContent.includes('VLM loaded')")
            page.fill("#k", str(K))
            page.set_input_files("#file", str(query))

            # the neighbour grid: k cards, each with a score, labels, a report and a loaded thumbnail
            wait_js(page, f"() => document.querySelectorAll('#grid .card').length === {K}")
            scores = page.locator("#grid .card .score").all_inner_texts()
            assert len(scores) == K and all(re.fullmatch(r"-?\d\.\d{3}", s) for s in scores), scores
            assert [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)
            wait_js(
                page,
                "() => [...document.querySelectorAll('#grid img.thumb')].filter(i => i.complete && i.naturalWidth > 0)"
                f".length === {K}",
            )
            assert page.locator("#grid .card .report").count() == K
            assert page.locator("#grid .card .labels .label").count() >= K

            # a click opens the study
            first = page.locator("#grid .card").first
            sid = first.get_attribute("data-study")
            first.click()
            wait_js(page, "() => document.querySelector('#study').open")
            wait_js(page, "() => !document.querySelector('#study-report').textContent.includes('loading')")
            assert sid in page.inner_text("#study-title")
            assert page.inner_text("#study-report").strip()
            page.keyboard.press("Escape")

            # Draft report: the text and the exemplars it rests on, as links
            page.click("#draft")
            wait_js(page, "() => document.querySelectorAll('#exemplars a.exemplar').length >= 1")
            text = page.inner_text("#draft-text").strip()
            assert text and text != "drafting…", text
            links = page.locator("#exemplars a.exemplar")
            assert links.count() >= 1 and (links.first.get_attribute("href") or "").startswith("#study/")
            assert page.inner_text("#exemplars p.report >> nth=0").strip()  # sentences the server split

            # [identify]: a box drawn over the query image
            page.click("#identify")
            page.wait_for_selector("#overlay .box[data-task=identify]", timeout=60_000)
            box = page.locator("#overlay .box[data-task=identify]").first.bounding_box()
            img = page.locator("#query-img").bounding_box()
            assert box and img and box["width"] > 0 and box["height"] > 0
            assert img["x"] - 2 <= box["x"] <= img["x"] + img["width"]

            # a question
            page.fill("#question", "is there a pleural effusion?")
            page.click("#vqa-form button")
            wait_js(page, "() => document.querySelector('#vqa-answer').textContent.startsWith('[vqa]')")
            page.screenshot(path=str(os.environ.get("CXR_BROWSER_SCREENSHOT") or tmp_path / "viewer.png"))
        finally:
            browser.close()
    assert errors == [], errors


def test_text_search_and_a_bad_upload_in_chromium(served, tmp_path):
    from serve.archive_link import archive_link

    url, root, df = served
    by_study = {r["study_id"]: r for r in df.to_dict("records")}
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a picture")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#k", "3")
            page.fill("#text", "right pleural effusion")
            page.click("#text-form button")
            wait_js(page, "() => document.querySelectorAll('#grid .card').length === 3")
            wait_js(page, "() => document.querySelector('#info').textContent.includes('studies')")
            # each card links to the archive's viewer exactly as serve/archive_link.py fills the template
            cards = page.evaluate(
                "() => [...document.querySelectorAll('#grid .card')].map(c => "
                "[c.dataset.study, c.querySelector('a.archive') && c.querySelector('a.archive').href])"
            )
            assert len(cards) == 3
            for sid, href in cards:
                assert href == archive_link(ARCHIVE, by_study[sid]), (sid, href)
            # the study dialog: a link for a study with UIDs, none for the one without
            for sid in ("s2", NO_UID_STUDY):
                page.evaluate(f"() => {{ location.hash = '#study/{sid}'; }}")
                wait_js(page, f"() => document.querySelector('#study-meta').textContent.includes('img{sid[1:]} ')")
                href = page.evaluate("() => (document.querySelector('#study-archive a') || {}).href || null")
                assert href == archive_link(ARCHIVE, by_study[sid]), (sid, href)
                page.keyboard.press("Escape")
            assert archive_link(ARCHIVE, by_study["s2"]) and archive_link(ARCHIVE, by_study[NO_UID_STUDY]) is None
            page.set_input_files("#file", str(bad))
            wait_js(page, "() => document.querySelector('#status').classList.contains('error')")
            assert page.inner_text("#status").startswith("415")
        finally:
            browser.close()
