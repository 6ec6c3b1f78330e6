"""One end-to-end test in ComfyUI's real web UI (headless Debian Chromium via Playwright): load a
bundled workflow, find our node in the node search, queue the graph and see its video output."""
from __future__ import annotations

import os
import shutil
import sys
import time

import pytest

import comfy_runtime

sys.path.insert(0, str(comfy_runtime.REPO_ROOT / "scripts"))
from comfy_workflow import load_workflow, set_ui_widget  # noqa: E402

from test_comfy_nodes import H, T, W, WORKFLOWS  # noqa: E402
from test_comfy_server import _Schema  # noqa: E402

CHROMIUM = os.environ.get("DC_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_page(comfy_server, tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium'; scripts/setup.sh installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python package 'playwright' missing (scripts/setup.sh installs it)")
    with sync_playwright() as pw:
        # Playwright gives Chromium a fresh empty profile of its own (no --user-data-dir flag allowed here).
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})   # a laptop (issue #32)
        logs = []
        page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
        try:
            yield page, logs
        finally:
            browser.close()


def _queue_and_wait(page, comfy_server, timeout: float = 300) -> list:
    """Queue the graph open in the UI (as the Run button does); the saved files once it succeeded."""
    before = set(comfy_server.get_json("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1) }")
    deadline = time.monotonic() + timeout
    entry = None
    while time.monotonic() < deadline and entry is None:
        hist = comfy_server.get_json("/history")
        new = [k for k in hist if k not in before]
        if new and hist[new[0]].get("status", {}).get("completed") is not None:
            entry = hist[new[0]]
        time.sleep(0.5)
    assert entry is not None, "the queued workflow never finished"
    assert entry["status"]["status_str"] == "success", entry["status"]
    return [i for o in entry["outputs"].values() for i in o.get("images", [])]


def _open_web_ui(page, comfy_server, settings: dict | None = None) -> None:
    """Open the web UI and set its settings, in order: the tutorial done, no Missing Models dialog,
    then `settings` (which may override those)."""
    page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
    wanted = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False, **(settings or {})}
    page.evaluate("async (wanted) => { const s = window.app.extensionManager.setting;"
                  " for (const [id, value] of Object.entries(wanted)) await s.set(id, value) }", wanted)


def _settle_view(page, wf: dict) -> None:
    """Wait for the workflow's saved view, applied after loadGraphData returns, then for the view to
    settle (the UI may adjust the stored scale)."""
    stored = (wf.get("extra") or {}).get("ds")
    if stored:
        try:
            page.wait_for_function("(s) => Math.abs(window.app.canvas.ds.scale - s) < 1e-3",
                                   arg=stored["scale"], timeout=5_000)
        except Exception:
            pass
    _settled_view(page)


def _settled_view(page) -> None:
    """Wait until the canvas view (offset, scale) stops changing: the UI fits a loaded graph's view."""
    last = None
    for _ in range(50):
        now = page.evaluate("() => [...window.app.canvas.ds.offset, window.app.canvas.ds.scale]")
        if now == last:
            return
        last = now
        page.wait_for_timeout(200)


def _empty_spot(page) -> dict:
    """Screen point of an empty spot of the canvas: no node (title bar included) or group under it,
    away from the edges (side bar, top menus, minimap at the bottom right); the templates fill most of
    the view."""
    spot = page.evaluate("""() => {
        const canvas = window.app.canvas, r = canvas.canvas.getBoundingClientRect();
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        const boxes = window.app.graph._nodes.map(n => [n.pos[0] - 10, n.pos[1] - title - 10,
                                                        n.size[0] + 20, n.size[1] + title + 20]);
        for (const g of window.app.graph._groups || []) boxes.push([...g._bounding || g.bounding]);
        for (let fy = 0.9; fy >= 0.25; fy -= 0.05)
            for (let fx = 0.1; fx <= 0.7; fx += 0.05) {
                const [gx, gy] = canvas.ds.convertOffsetToCanvas([r.width * fx, r.height * fy]);
                if (!boxes.some(([x, y, w, h]) => gx >= x && gx <= x + w && gy >= y && gy <= y + h))
                    return {x: r.x + r.width * fx, y: r.y + r.height * fy};
            }
        return null;
    }""")
    assert spot, "no empty spot on the canvas"
    return spot


def _open_node_search(page):
    """The node search box, opened as a user does: a double-click on empty canvas."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError   # present: browser_page did not skip
    spot = _empty_spot(page)
    search = page.locator("input[placeholder*='earch'], .comfy-vue-node-search-container input, "
                          ".litesearchbox input").first
    for attempt in range(3):
        # A canvas still busy with the just-loaded graph can take the double-click as two
        # clicks (seen once in CI on a loaded machine): a user would double-click again.
        page.keyboard.press("Escape")
        page.mouse.dblclick(spot["x"], spot["y"])
        try:
            search.wait_for(state="visible", timeout=10_000)
            break
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
    return search


def test_web_ui_loads_workflow_finds_node_and_runs_it(browser_page, comfy_server, comfy_base, tmp_path):
    page, logs = browser_page
    schema = _Schema(comfy_server.object_info())
    wf = load_workflow(WORKFLOWS / "DynamiCrafter image to video.json")
    set_ui_widget(wf, "DynamiCrafterLoader", "ckpt_name", "dc_tiny_v.safetensors", schema)
    set_ui_widget(wf, "LoadImage", "image", "single_image.png", schema)
    for name, value in (("width", W), ("height", H), ("frames", T)):
        set_ui_widget(wf, "DynamiCrafterImageConditioning", name, value, schema)
    set_ui_widget(wf, "DynamiCrafterDDIMSampler", "steps", 3, schema)
    set_ui_widget(wf, "SaveVideo", "filename_prefix", "video/browser_test", schema)

    shot = tmp_path / "ui.png"
    try:
        page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
        page.evaluate("async () => { try { await window.app.extensionManager.setting.set("
                      "'Comfy.TutorialCompleted', true) } catch (e) {} }")
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
        types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
        assert "DynamiCrafterDDIMSampler" in types and "DynamiCrafterLoader" in types, types

        # The node search box: double-click on empty canvas, type, see our node offered.
        search = _open_node_search(page)
        search.fill("DynamiCrafter DDIM")
        page.get_by_text("DynamiCrafter DDIM Sampler", exact=False).first.wait_for(state="visible", timeout=20_000)
        # what users type: the frontend fuzzy-searches node ids and display names, and only near the
        # start of a name (Fuse.js, threshold 0.3 over a distance of 100 characters)
        for words, title in (("VideoCrafter", "VideoCrafter Text to Video"), ("animate", "Animate Image to Video"),
                             ("image to video", "Animate Image to Video"), ("interpolation", "Animate Image to Video"),
                             ("DynamiCrafter Image Conditioning", "Animate Image to Video"),
                             ("ToonCrafter", "ToonCrafter / DynamiCrafter Keyframes")):
            search.fill(words)
            page.get_by_text(title, exact=False).first.wait_for(state="visible", timeout=20_000)
        page.keyboard.press("Escape")

        files = _queue_and_wait(page, comfy_server)
        assert files and files[0]["filename"].startswith("browser_test") and files[0]["filename"].endswith(".mp4")
        # The UI shows the result: the SaveVideo node gets a video preview.
        page.wait_for_selector("video", state="attached", timeout=60_000)
    except Exception:
        try:
            page.screenshot(path=str(shot))
            keep = comfy_runtime.REPO_ROOT / ".pytest_cache" / "browser_failure.png"
            keep.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, keep)
        except Exception:
            pass
        print("\n".join(logs[-40:]))
        raise


# What artists type (issue #32), and the node that must be among the first results: the frontend
# ranks names that start with the words, then whole words, then substrings (shorter names first).
SEARCH_WORDS = {"image to video": "Image to Video (DynamiCrafter", "loop": "loop, ToonCrafter",
                "dynamicrafter": "Image to Video (DynamiCrafter", "tooncrafter": "ToonCrafter",
                "interpolation": "Interpolation (DynamiCrafter)"}


def test_node_search_ranks_our_nodes_for_artist_words(browser_page, comfy_server):
    page, logs = browser_page
    _open_web_ui(page, comfy_server)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }",
                  load_workflow(WORKFLOWS / "DynamiCrafter demo.json"))
    search = _open_node_search(page)
    ranks = {}
    for words, title in SEARCH_WORDS.items():
        search.fill(words)
        page.get_by_text(title, exact=False).first.wait_for(state="visible", timeout=20_000)
        names = page.evaluate("() => [...document.querySelectorAll('.option-display-name')].map(e => e.innerText)")
        ranks[words] = next((i + 1 for i, n in enumerate(names) if title in n), None)
        assert ranks[words] is not None and ranks[words] <= 3, (words, names[:8])
    page.keyboard.press("Escape")
    print("search ranks:", ranks)


def test_a_link_dragged_from_the_loaders_clip_vision_offers_our_encoders_only(browser_page, comfy_server):
    """Dragging the loader's clip_vision output onto empty canvas opens the node search filtered by its
    type (the setting new installs get): it lists the pack's encoders, the one-node Image to Video first,
    and not core 'CLIP Vision Encode', whose output our resampler cannot read (issue #32, item 4)."""
    page, logs = browser_page
    _open_web_ui(page, comfy_server, {"Comfy.LinkRelease.Action": "search box"})
    wf = load_workflow(WORKFLOWS / "DynamiCrafter demo.json")
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
    _settle_view(page, wf)
    slot = page.evaluate("""() => {
        const canvas = window.app.canvas, r = canvas.canvas.getBoundingClientRect();
        const loader = window.app.graph._nodes.find(n => n.type === 'DynamiCrafterLoader');
        const [x, y] = loader.getConnectionPos(false, loader.outputs.findIndex(o => o.name === 'clip_vision'));
        const {offset, scale} = canvas.ds;     // graph -> canvas pixels
        return {x: r.x + (x + offset[0]) * scale, y: r.y + (y + offset[1]) * scale};
    }""")
    points = {"from": slot, "to": _empty_spot(page)}
    page.mouse.move(points["from"]["x"], points["from"]["y"])
    page.mouse.down()
    page.mouse.move(points["to"]["x"], points["to"]["y"], steps=12)
    page.mouse.up()
    page.locator(".option-display-name").first.wait_for(state="visible", timeout=20_000)
    names = page.evaluate("() => [...document.querySelectorAll('.option-display-name')].map(e => e.innerText)")
    page.keyboard.press("Escape")
    print("offered for clip_vision:", names)
    assert names and names[0].startswith("Image to Video (DynamiCrafter"), names
    assert any(n.startswith("DynamiCrafter CLIP Vision Encode") for n in names), names
    assert not any(n.startswith("CLIP Vision Encode") for n in names), names


def test_missing_model_brings_up_the_download_dialog(browser_page, comfy_server):
    """A shared workflow names the official checkpoint the user does not have yet: the web UI's
    missing-models dialog lists it (from the loader's properties.models) with its official URL."""
    page, logs = browser_page
    wf = load_workflow(WORKFLOWS / "DynamiCrafter image to video.json")   # as shipped: dynamicrafter_512.ckpt
    entry = next(n for n in wf["nodes"] if n["type"] == "DynamiCrafterLoader")["properties"]["models"][0]
    assert entry["url"].startswith("https://huggingface.co/Doubiiu/") and entry["directory"] == "checkpoints"
    _open_web_ui(page, comfy_server, {"Comfy.Workflow.ShowMissingModelsWarning": True})
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
    page.get_by_text("Missing Models", exact=False).first.wait_for(state="visible", timeout=30_000)
    page.get_by_text(f"checkpoints / {entry['name']}", exact=False).first.wait_for(state="visible", timeout=10_000)
    page.keyboard.press("Escape")
    # The dialog refuses .ckpt downloads (no Download, no Copy URL): the template's Note, as the UI
    # shows it, carries the link and the folder to save the file in.
    notes = page.evaluate("() => window.app.graph._nodes.filter(n => n.type === 'Note').map(n => n.widgets[0].value)")
    assert any(entry["url"] in t and f"models/checkpoints/{entry['name']}" in t for t in notes), notes
    page.wait_for_function("(url) => [...document.querySelectorAll('textarea')].some(t => t.value.includes(url) "
                           "&& t.getBoundingClientRect().width > 0)", arg=entry["url"], timeout=10_000)


def test_bundled_workflows_open_without_overlapping_nodes(browser_page, comfy_server):
    """Every template as the web UI lays it out (nodes grow to fit their widgets): no node covers
    another, title bars included, and the graph's output node is inside the opening view."""
    page, logs = browser_page
    _open_web_ui(page, comfy_server)
    for path in sorted(WORKFLOWS.glob("*.json")):
        wf = load_workflow(path)
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
        _settle_view(page, wf)
        boxes = page.evaluate("""() => {
            const title = LiteGraph.NODE_TITLE_HEIGHT;
            return window.app.graph._nodes.map(n => ({id: n.id, type: n.type, """
                              """out: !!n.constructor.nodeData?.output_node,
                x: n.pos[0], y: n.pos[1] - title, w: n.size[0], h: n.size[1] + title}));
        }""")
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                overlap = (min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"]),
                           min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"]))
                assert min(overlap) <= 0, f"{path.name}: {a['type']} #{a['id']} overlaps {b['type']} #{b['id']}"
        view = page.evaluate("""() => { const ds = window.app.canvas.ds, c = window.app.canvas.canvas;
            return {x: -ds.offset[0], y: -ds.offset[1], w: c.width / ds.scale, h: c.height / ds.scale}; }""")
        # Text is drawn: below the frontend's low-quality zoom threshold (its MinFontSizeForLOD setting over
        # LiteGraph's node text size) the classic canvas hides every text, the Notes' included.
        lod = page.evaluate("() => ({scale: window.app.canvas.ds.scale, low: window.app.canvas.low_quality, "
                            "threshold: window.app.canvas._lowQualityZoomThreshold})")
        assert lod["threshold"] > 0.5 and lod["scale"] >= lod["threshold"] and not lod["low"], (path.name, lod)
        assert any(b["out"] for b in boxes), path.name
        for o in boxes:     # the whole graph opens in view at 1440x900, the output (Save Video) included
            assert view["x"] <= o["x"] and o["x"] + o["w"] <= view["x"] + view["w"] and \
                view["y"] <= o["y"] and o["y"] + o["h"] <= view["y"] + view["h"], \
                f"{path.name}: node {o['type']} #{o['id']} is outside the opening view {view} at 1440x900"


def test_templates_browser_shows_our_templates_with_thumbnails(browser_page, comfy_server):
    """The Templates browser (Browse Templates) lists every bundled workflow under the pack's
    category, titled "DynamiCrafter" by the pack's locales/en/main.json, each card titled by its
    (human) file name and showing its thumbnail: workflows/<name>.jpg fetched and drawn."""
    from make_thumbnails import THUMB_SIZE
    from make_workflows import TEMPLATE_CATEGORY
    from urllib.parse import unquote
    page, logs = browser_page
    prefix = f"/api/workflow_templates/{comfy_runtime.PACK_NAME}/"
    fetched = {}
    page.on("response",
            lambda r: fetched.__setitem__(unquote(r.url.split(prefix)[-1]), r.status) if prefix in r.url else None)
    page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.TutorialCompleted', true) }")
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates') }")
    page.get_by_text(TEMPLATE_CATEGORY, exact=True).first.click(timeout=30_000)   # the pack's category
    card_picture = """(name) => {
        const title = [...document.querySelectorAll('*')].find(e => e.childElementCount === 0 &&
                                                                  e.textContent.trim() === name);
        let card = title;
        while (card && !card.querySelector('img')) card = card.parentElement;
        const img = card && card.querySelector('img');
        return img && img.complete ? img.naturalWidth : 0; }"""
    from make_workflows import WORKFLOWS as ORDER
    try:
        names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
        page.get_by_text(names[0], exact=True).first.wait_for(state="attached", timeout=30_000)
        shown = page.evaluate("""(names) => [...document.querySelectorAll('*')].filter(e => e.childElementCount === 0
            && names.includes(e.textContent.trim())).map(e => e.textContent.trim())""", names)
        shown = list(dict.fromkeys(shown))     # a card may repeat its title (e.g. as the picture's label)
        assert shown[0] == "DynamiCrafter demo", shown        # the one that runs out of the box leads
        assert shown == [n[:-5] for n in ORDER if n[:-5] in names], shown
        for name in names:   # cards load their pictures as they scroll in
            page.get_by_text(name, exact=True).first.scroll_into_view_if_needed(timeout=20_000)
            page.wait_for_function(f"(name) => ({card_picture})(name) === {THUMB_SIZE[0]}", arg=name, timeout=20_000)
            for _ in range(50):          # the response event may trail the drawn picture
                if f"{name}.jpg" in fetched:
                    break
                page.wait_for_timeout(200)
            assert fetched.get(f"{name}.jpg") == 200, (name, fetched)
    except Exception:
        keep = comfy_runtime.REPO_ROOT / ".pytest_cache" / "browser_templates_failure.png"
        keep.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(keep))
        print("\n".join(logs[-40:]))
        raise
    finally:
        page.keyboard.press("Escape")


def test_demo_template_runs_as_shipped_in_the_web_ui(browser_page, comfy_server, comfy_base):
    """Every template that fits the bundled demo model runs unchanged: the demo preset, Motion brush and
    Video to video, each opened in
    the web UI with the files its note names in place, queued as is, saves its video."""
    page, logs = browser_page
    demo = comfy_runtime.REPO_ROOT / "assets" / "demo" / "dynamicrafter_demo.safetensors"
    if not demo.is_file():
        pytest.skip(f"{demo} not found (the demo model is built by training/; see README)")
    shutil.copyfile(demo, comfy_base / "models" / "checkpoints" / demo.name)
    shutil.copyfile(comfy_runtime.REPO_ROOT / "assets" / "example.png", comfy_base / "input" / "example.png")
    for name in ("motion_mask.png", "motion_clip.mp4"):          # the motion templates' inputs (their notes)
        shutil.copyfile(comfy_runtime.REPO_ROOT / "assets" / "examples" / name, comfy_base / "input" / name)
    page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.TutorialCompleted', true) }")
    for workflow, prefix in (("DynamiCrafter demo.json", "dynamicrafter_demo"),
                             ("Motion brush.json", "dynamicrafter_motion_brush"),
                             ("Video to video.json", "dynamicrafter_v2v")):
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", load_workflow(WORKFLOWS / workflow))
        files = _queue_and_wait(page, comfy_server, timeout=600)      # 25 steps on a CPU shared with other jobs
        assert [f["filename"] for f in files if f["filename"].startswith(prefix)], (workflow, files)


NODES_2 = "Comfy.VueNodes.Enabled"     # frontend 1.32.9's setting: "Modern Node Design (Nodes 2.0)"


def test_bundled_workflows_open_fully_in_view_in_nodes_2(browser_page, comfy_server, comfy_base):
    """Issue #32: with Nodes 2.0 (Vue DOM nodes, which size themselves to their widgets) every template
    opens with each node's DOM box inside the 1440x900 window's canvas, and no two nodes overlap; with
    the example inputs in input/ as the notes say (a loaded picture's preview is taller than an empty one)."""
    page, logs = browser_page
    assets = comfy_runtime.REPO_ROOT / "assets"
    for f in [*assets.glob("*.png"), *(assets / "examples").iterdir()]:
        shutil.copyfile(f, comfy_base / "input" / f.name)
    _open_web_ui(page, comfy_server, {NODES_2: True})
    problems = []
    try:
        for path in sorted(WORKFLOWS.glob("*.json")):
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", load_workflow(path))
            page.wait_for_function("() => document.querySelectorAll('.lg-node[data-node-id]').length === "
                                   "window.app.graph._nodes.length", timeout=30_000)
            page.wait_for_function("() => [...document.querySelectorAll('.lg-node img')].every(i => i.complete) && "
                                   "[...document.querySelectorAll('.lg-node video')].every(v => v.readyState >= 1)",
                                   timeout=30_000)      # the previews have their pictures: nodes at full height
            _settled_view(page)
            page.wait_for_timeout(300)      # the DOM nodes follow the view on the next frames
            canvas, boxes = page.evaluate("""() => {
                const r = e => { const b = e.getBoundingClientRect();
                                 return {x: b.x, y: b.y, w: b.width, h: b.height}; };
                return [r(window.app.canvas.canvas), [...document.querySelectorAll('.lg-node[data-node-id]')]
                        .map(e => ({id: e.getAttribute('data-node-id'), ...r(e)}))]; }""")
            assert canvas["w"] <= 1440 and canvas["h"] <= 900, canvas
            for b in boxes:
                if not (canvas["x"] <= b["x"] and b["x"] + b["w"] <= canvas["x"] + canvas["w"] and
                        canvas["y"] <= b["y"] and b["y"] + b["h"] <= canvas["y"] + canvas["h"]):
                    problems.append(f"{path.name}: node #{b['id']} {b} is outside the canvas {canvas}")
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    overlap = (min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"]),
                               min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"]))
                    if min(overlap) > 0:
                        problems.append(f"{path.name}: node #{a['id']} {a} overlaps #{b['id']} {b}")
        assert not problems, "at 1440x900 in Nodes 2.0:\n" + "\n".join(problems)
    except Exception:
        keep = comfy_runtime.REPO_ROOT / ".pytest_cache" / "browser_nodes_2_failure.png"
        keep.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(keep))
        print("\n".join(logs[-40:]))
        raise
    finally:
        page.evaluate("async (id) => { await window.app.extensionManager.setting.set(id, false) }", NODES_2)


def test_camera_moves_template_runs_in_the_web_ui(browser_page, comfy_server, comfy_base):
    """Issue #31: 'Camera moves' opened in the web UI with its checkpoint set to the tiny CamI2V model,
    queued, saves a video. The conditioning's 0 would take the size from the model's metadata (the
    cami2v_256 preset: 256x256), but the tiny file's epipolar masks are built for its YAML's
    origin_h x origin_w (64x64) and it runs at that size only: the one other widget set."""
    import yaml
    page, logs = browser_page
    ckpts = comfy_base / "models" / "checkpoints"
    if not (ckpts / "cami2v_tiny.safetensors").exists():
        pytest.skip("the tiny CamI2V checkpoint is not in the reference folder")
    shutil.copyfile(comfy_runtime.REPO_ROOT / "assets" / "examples" / "scene1.png", comfy_base / "input" / "scene1.png")
    epipolar = yaml.safe_load((ckpts / "cami2v_tiny.yaml").read_text())["model"]["params"]["epipolar_config"]
    wf, schema = load_workflow(WORKFLOWS / "Camera moves.json"), _Schema(comfy_server.object_info())
    set_ui_widget(wf, "DynamiCrafterLoader", "ckpt_name", "cami2v_tiny.safetensors", schema)
    for name, key in (("width", "origin_w"), ("height", "origin_h")):
        set_ui_widget(wf, "DynamiCrafterImageConditioning", name, int(epipolar[key]), schema)
    _open_web_ui(page, comfy_server)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", wf)
    assert "DynamiCrafterCamera" in page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    files = _queue_and_wait(page, comfy_server, timeout=600)
    assert [f for f in files if f["filename"].startswith("cami2v_camera") and f["filename"].endswith(".mp4")], files


def test_core_sampler_templates_queue_the_models_own_guidance(browser_page, comfy_server):
    """Issue #32: the two core-sampler templates feed KSampler's cfg / DualCFGGuider's cfg_conds and
    cfg_cond2_negative from Variant Defaults ('Model's own guidance'); what the web UI queues links
    those widgets to its outputs (the number typed in the widget is not what runs)."""
    page, logs = browser_page
    _open_web_ui(page, comfy_server)
    wanted = {"DynamiCrafter with KSampler.json": ("DualCFGGuider", {"cfg_conds": "cfg_text",
                                                                   "cfg_cond2_negative": "cfg_cond2_negative"}),
              "Long shot - context windows.json": ("KSampler", {"cfg": "cfg_text"})}
    names = comfy_server.object_info()["DynamiCrafterVariantDefaults"]["output_name"]
    for template, (node_type, links) in wanted.items():
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", load_workflow(WORKFLOWS / template))
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        defaults = [k for k, n in prompt.items() if n["class_type"] == "DynamiCrafterVariantDefaults"]
        sampler = next(n for n in prompt.values() if n["class_type"] == node_type)
        assert len(defaults) == 1, (template, defaults)
        for widget, output in links.items():
            assert sampler["inputs"][widget] == [defaults[0], names.index(output)], (template, widget, sampler)
