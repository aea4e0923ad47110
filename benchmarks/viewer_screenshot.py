"""docs/viewer.png: the web viewer over the `cxr demo` work folder, in Debian's headless Chromium.

    python -m benchmarks.viewer_screenshot [--workdir ~/.cache/cxr-retrieval/demo] [--out docs/viewer.png]

Starts `cxr serve` over the demo's index and VLM, uploads the demo's held-out query image, waits for the
neighbour grid, drafts a report, runs [identify], asks a question, opens nothing else, and saves the page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.serve_common import CHROMIUM_ARGS, REPO, start_server, stop_server, wait_js


def main() -> None:
    from playwright.sync_api import sync_playwright

    from retrieval.data.manifest import read_manifest, resolve_image_path
    from serve.demo_pipeline import DEFAULT_WORKDIR, pick_query

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "viewer.png")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--question", default="is there a pleural effusion?")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    a = p.parse_args()
    corpus = a.workdir / "corpus"
    manifest = read_manifest(corpus / "manifest.parquet")
    query = resolve_image_path(corpus, pick_query(manifest)["image_path"])
    proc, url = start_server(
        ["--index", str(a.workdir / "index"), "--vlm", str(a.workdir / "vlm"), "--watch-interval", "0"],
        Path("/tmp") / "cxr-viewer-screenshot.log",
    )
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url + "/")
            wait_js(page, "() => document.querySelector('#info').textContent.includes('VLM')")
            page.fill("#k", str(a.k))
            page.set_input_files("#file", str(query))
            wait_js(
                page,
                f"() => document.querySelectorAll('#grid img.thumb').length === {a.k} && "
                "[...document.querySelectorAll('#grid img.thumb')].every(i => i.complete && i.naturalWidth)",
            )
            page.click("#draft")
            wait_js(page, "() => document.querySelectorAll('#exemplars a.exemplar').length > 0")
            page.click("#identify")
            wait_js(page, "() => document.querySelector('#box-answer').textContent.startsWith('[identify]')")
            page.fill("#question", a.question)
            page.click("#vqa-form button")
            wait_js(page, "() => document.querySelector('#vqa-answer').textContent.startsWith('[vqa]')")
            a.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(a.out), full_page=True)
            print(f"query {query.name}; identify: {page.inner_text('#box-answer')!r}; saved {a.out}")
            browser.close()
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
