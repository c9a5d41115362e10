"""The pack in ComfyUI's real frontend, driven in headless Chromium (marker ``browser``).

With the real server (tests/workflow_tools.live_server) and Debian's
``/usr/bin/chromium`` through the PyPI ``playwright`` package (never
``playwright install``):

1. the page loads and registers the ``klora.fusion.preview`` extension;
2. the SDXL example workflow (generated model/LoRA names, test sizes) loads;
   the three K-LoRA nodes are there with their widgets and values, on screen;
3. the live selection map appears on "K-LoRA Fuse" without queueing anything,
   and clicking alpha's increment arrow redraws it within a second;
4. "Run" executes the graph on the small models and the server-side map image
   appears on the node, and the report under the live map, line by line;
5. the other example workflows load with every node type known and a ready
   preview; the Vue node frontend ("Nodes 2.0") shows the preview too; with
   the extension disabled in ComfyUI's settings the nodes still load and run
   and the run's map still appears on the node;
6. no uncaught page error, no console error or warning from this pack, and no
   failed /klora request.

test_settings_follow_the_graph (issue 14): a 0.1.0 workflow (beta -1) shows
beta 0.5 and previews exactly what it did; switching the pattern switches beta
between the patterns' paper values; map_steps follows the linked KSampler's
steps until the user overrides it; the caption shows the resolved alpha and
beta; the map has a legend, block labels and a hover readout (weight, step,
choice) that matches /klora/preview's own answer; the node is sized to its
content; the same holds in the Vue node renderer.

Screenshots go to test-artifacts/ (gitignored).  Without Chromium or
playwright the test is skipped with the reason, except under CI (``CI`` set),
where .ci/run installs Chromium and a missing browser is a failure.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from support import workflow_tools as wt

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

CHROMIUM = os.environ.get("KLORA_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = wt.REPO_ROOT / "test-artifacts"
VIEWPORT = {"width": 1600, "height": 1000}
EXTENSION = "klora.fusion.preview"
PREVIEW = ".klora-preview"
MIN_CLICKS = 8  # alpha 1.5 -> 1.9: a change you can see in the screenshots


def _browser_or_skip():
    problems = []
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        problems.append("the 'playwright' package is not installed (pip install -r requirements-test.txt)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        problems.append(f"{CHROMIUM} not found (apt-get install -y chromium; .ci/run does this)")
    if problems:
        message = "browser test needs: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


class Page:
    """A playwright page on the live server that records console errors, page errors and failed requests."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page_errors, self.console, self.bad_requests = [], [], []
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        self.page.on("console", lambda msg: self.console.append((msg.type, msg.text)))
        self.page.on("response", lambda r: self.bad_requests.append(f"{r.status} {r.url}")
                     if r.status >= 400 and "/klora/" in r.url else None)
        # The "Nodes 2.0" announcement banner would cover the top of the canvas.
        self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page.goto(url)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=90_000)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def load(self, workflow: dict) -> None:
        self.js("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        self.page.mouse.move(2, VIEWPORT["height"] - 2)  # no tooltip over the nodes

    def wait_preview(self, state: str = "ready", timeout: float = 10_000) -> dict:
        self.page.wait_for_function(
            "(s) => { const el = document.querySelector('.klora-preview'); return el && el.dataset.kloraState === s; }",
            arg=state, timeout=timeout)
        return self.preview()

    def preview(self) -> dict:
        return self.js("""() => {
            const el = document.querySelector('.klora-preview');
            if (!el) return null;
            const r = el.getBoundingClientRect();
            const canvas = el.querySelector('canvas');
            return {state: el.dataset.kloraState, perStep: el.dataset.kloraSubjectPerStep,
                    query: el.dataset.kloraQuery, caption: el.querySelector('.klora-preview-caption').textContent,
                    rect: [r.left, r.top, r.width, r.height], visible: r.width > 20 && r.height > 20,
                    pixels: canvas.toDataURL()};
        }""")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path

    def own_console_problems(self) -> list:
        """Console errors/warnings that come from this pack: its log prefix, its script, its route.

        (The offline frontend also logs its own failed look-ups of node ids on the registry, blocked by
        the server's Content-Security-Policy; those are not the pack's.)
        """
        markers = ("[K-LoRA", "klora.js", "/klora/", "klora.fusion")
        return [f"{kind}: {text}" for kind, text in self.console
                if kind in ("error", "warning") and any(m in text for m in markers)]


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def live(request):
    return wt.live_server(request)


def _set_vue_nodes(page: Page, enabled: bool) -> None:
    page.js("async (on) => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }", enabled)


NODE_STATE = """(type) => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => n.type === type);
    if (!node) return null;
    const rect = app.canvas.canvas.getBoundingClientRect();
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
    return {id: node.id, title: node.title, size: [node.size[0], node.size[1]],
            widgets: (node.widgets || []).map((w) => [w.name, w.value, w.label]),
            screen: [x + rect.left, y + rect.top], known: !!LiteGraph.registered_node_types[type]};
}"""

ALPHA_ARROW = """() => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => n.type === 'KLoRAFuse');
    const w = node.widgets.find((w) => w.name === 'alpha');
    const h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT || 20;
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] - 25, node.pos[1] + w.y + h / 2]);
    const rect = app.canvas.canvas.getBoundingClientRect();
    return [x + rect.left, y + rect.top];
}"""

# Screen rectangle around some nodes (title bars included), clipped to the viewport.
NODES_BOX = """(types) => {
    const app = window.app;
    const rect = app.canvas.canvas.getBoundingClientRect();
    const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const node of app.graph.nodes.filter((n) => types.includes(n.type))) {
        const [ax, ay] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
        const [bx, by] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
        x0 = Math.min(x0, ax); y0 = Math.min(y0, ay); x1 = Math.max(x1, bx); y1 = Math.max(y1, by);
    }
    const pad = 12;
    const left = Math.max(0, rect.left + x0 - pad), top = Math.max(0, rect.top + y0 - pad);
    const right = Math.min(window.innerWidth, rect.left + x1 + pad);
    const bottom = Math.min(window.innerHeight, rect.top + y1 + pad);
    return {x: left, y: top, width: right - left, height: bottom - top};
}"""

# The report under the live map: its text, how many lines it is drawn on, whether the node holds it.
REPORT_STATE = """() => {
    const app = window.app;
    const el = document.querySelector('.klora-report');
    const node = app.graph.nodes.find((n) => n.type === 'KLoRAFuse');
    const r = el.getBoundingClientRect();
    const c = app.canvas.canvas.getBoundingClientRect();
    const [, bottom] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + node.size[1]]);
    return {text: el.textContent, lines: Math.round(el.scrollHeight / parseFloat(getComputedStyle(el).lineHeight)),
            inside: r.bottom <= c.top + bottom + 2, height: r.height};
}"""

# Timestamps of the last pointerdown and of every preview update, taken inside the page.
TIMING_PROBE = """() => {
    window.__kloraProbe = {down: null, updates: []};
    window.addEventListener('pointerdown', () => { window.__kloraProbe.down = performance.now(); }, true);
    const el = document.querySelector('.klora-preview');
    new MutationObserver(() => window.__kloraProbe.updates.push([performance.now(), el.dataset.kloraSubjectPerStep]))
        .observe(el, {attributes: true, attributeFilter: ['data-klora-subject-per-step']});
}"""


def test_fusion_in_the_browser(live, browser):
    started = time.monotonic()
    names, info = live.names, live.object_info
    workflow = wt.adapt_ui(wt.load_ui("klora_sdxl_subject_style"), names, info)
    # A fresh seed each run: the server would otherwise answer a repeated graph from its cache.
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][0] = int(time.time()) % 100_000

    page = Page(browser, live.server.url)
    _set_vue_nodes(page, False)
    page.js("async () => { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); }")
    assert EXTENSION in page.js("() => (window.app.extensions || []).map((e) => e.name)"), "web/klora.js not loaded"

    # 2. the workflow and the three K-LoRA nodes with their widgets
    page.load(workflow)
    sampler_steps = next(n for n in workflow["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    expected_widgets = {
        "KLoRASubjectLoader": ["lora_name", "strength", "strength_clip"],
        "KLoRAStyleLoader": ["lora_name", "strength", "strength_clip"],
        "KLoRAFuse": ["pattern", "alpha", "beta", "scope", "outside_scope", "progress_measure", "map_steps",
                      "mode", "flip_cache", "klora_preview"],
    }
    for node_type, widget_names in expected_widgets.items():
        state = page.js(NODE_STATE, node_type)
        assert state is not None and state["known"], f"{node_type} missing from the loaded graph"
        assert [w[0] for w in state["widgets"]] == widget_names, state["widgets"]
        x, y = state["screen"]
        assert 0 <= x < VIEWPORT["width"] and 0 <= y < VIEWPORT["height"], f"{node_type} is off screen: {state}"
        saved = list(next(n for n in workflow["nodes"] if n["type"] == node_type)["widgets_values"])
        if node_type == "KLoRAFuse":  # map_steps follows the KSampler the fuse feeds
            saved[widget_names.index("map_steps")] = sampler_steps
        assert [w[1] for w in state["widgets"]][: len(saved)] == saved, (node_type, state["widgets"], saved)
        if node_type == "KLoRAFuse":  # a short label where the Vue renderer would cut the name (locales/en)
            assert dict((w[0], w[2]) for w in state["widgets"])["progress_measure"] == "progress", state["widgets"]

    # 3. the live map, then alpha changed through the node's own increment arrow
    first = page.wait_preview("ready")
    assert first["visible"], first
    box = page.js(MAP_BOX)  # the example's node is sized to its content (was 700 units, half empty)
    assert box["size"][1] <= 520 and box["nodeBottom"] - box["rootBottom"] < 40, box
    assert "24 weights" in first["caption"] and f"{sampler_steps} steps (from the KSampler)" in first["caption"]
    assert "α 1.5 · β 0.5" in first["caption"], first["caption"]
    page.screenshot("browser_1_loaded.png")
    page.js(TIMING_PROBE)
    arrow = page.js(ALPHA_ARROW)
    clicks = 0
    alpha = 1.5
    while clicks < 40:
        page.page.mouse.click(*arrow)
        clicks += 1
        page.page.wait_for_timeout(350)  # also keeps two clicks from reading as a double click
        alpha = page.js("() => window.app.graph.nodes.find((n) => n.type === 'KLoRAFuse')"
                        ".widgets.find((w) => w.name === 'alpha').value")
        now = page.preview()
        if (clicks >= MIN_CLICKS and now["state"] == "ready" and now["perStep"] != first["perStep"]
                and f"alpha={alpha}" in now["query"]):
            break
    page.page.mouse.move(2, VIEWPORT["height"] - 2)
    page.page.wait_for_timeout(300)
    updated = page.preview()
    assert alpha > 1.5 and f"alpha={alpha}" in updated["query"], (alpha, updated["query"])
    assert updated["perStep"] != first["perStep"] and updated["pixels"] != first["pixels"], "the map did not change"
    probe = page.js("() => window.__kloraProbe")
    last_update = max(t for t, value in probe["updates"] if value == updated["perStep"])
    latency = (last_update - probe["down"]) / 1000.0
    assert latency < 1.0, f"the map took {latency:.2f} s to follow the last click"
    page.screenshot("browser_2_alpha_changed.png")

    # 4. queue the graph ("Run") and see the run's map image on the node
    page.page.locator("button:has-text('Run')").first.click()
    page.page.wait_for_function("""() => {
        const app = window.app;
        const fuse = app.graph.nodes.find((n) => n.type === 'KLoRAFuse');
        const save = app.graph.nodes.find((n) => n.type === 'SaveImage');
        const img = fuse.imgs && fuse.imgs[0];
        return img && img.complete && img.naturalWidth > 0 && img.src.includes('klora_map_')
            && (app.nodeOutputs?.[String(save.id)]?.images?.length > 0);
    }""", timeout=180_000)
    page.page.mouse.move(2, VIEWPORT["height"] - 2)
    page.page.wait_for_timeout(500)
    after_run = page.screenshot("browser_3_after_run.png")
    # The K-LoRA part of the graph alone (the README's picture is taken from this one).
    box = page.js(NODES_BOX, ["CheckpointLoaderSimple", "KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse",
                              "KSampler"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.page.screenshot(path=str(ARTIFACTS / "browser_nodes.png"), clip=box)
    output = page.js("() => window.app.nodeOutputs[String(window.app.graph.nodes.find("
                     "(n) => n.type === 'KLoRAFuse').id)]")
    assert f"alpha {alpha:g}," in output["text"][0], output["text"][0]
    # the report on the node, with its line breaks, inside the node (which grew to hold it)
    page.page.wait_for_function("() => document.querySelector('.klora-report')?.offsetHeight > 20", timeout=10_000)
    report = page.js(REPORT_STATE)
    assert report["text"] == output["text"][0] and report["text"].count("\n") >= 5, report
    assert report["lines"] >= report["text"].count("\n") + 1 and report["inside"], report
    assert page.preview()["state"] == "ready", "the live preview must survive a run"
    assert after_run.stat().st_size > 10_000

    # 5a. every example workflow loads: all node types known, preview ready
    for name in wt.WORKFLOW_NAMES:
        page.load(wt.adapt_ui(wt.load_ui(name), names, info))
        unknown = page.js("() => window.app.graph.nodes.filter((n) => !LiteGraph.registered_node_types[n.type])"
                          ".map((n) => n.type)")
        assert unknown == [], f"{name}: unknown node types {unknown}"
        fuse = next(n for n in wt.load_api(name).values() if n["class_type"] == "KLoRAFuse")["inputs"]
        wanted = f"map_steps={wt.SMALL_STEPS}"  # the adapted KSampler's steps, which map_steps follows
        page.page.wait_for_function(
            "(q) => [...document.querySelectorAll('.klora-preview')].some("
            "(el) => el.dataset.kloraState === 'ready' && (el.dataset.kloraQuery || '').endsWith(q))",
            arg=wanted, timeout=10_000)
        state = page.preview()
        assert state["visible"] and state["query"].endswith(wanted), (name, state["query"])
        pattern = "s%2A" if fuse["pattern"] == "s*" else "s"
        assert f"pattern={pattern}&" in state["query"].replace("s*", "s%2A"), (name, state["query"])

    # 5b. the Vue node frontend ("Nodes 2.0")
    _set_vue_nodes(page, True)
    try:
        vue = Page(browser, live.server.url)
        vue.load(workflow)
        state = vue.wait_preview("ready")
        assert state["visible"], state
        vue.screenshot("browser_4_vue_nodes.png")
        box = vue.js(NODES_BOX, ["CheckpointLoaderSimple", "KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse",
                                 "KSampler"])
        vue.page.screenshot(path=str(ARTIFACTS / "browser_nodes_vue.png"), clip=box)
        assert not vue.page_errors, vue.page_errors
        assert not vue.own_console_problems(), vue.own_console_problems()
        assert not vue.bad_requests, vue.bad_requests
        vue.page.close()
    finally:
        _set_vue_nodes(page, False)

    # 5c. the extension disabled in ComfyUI's settings: no preview, the nodes and the run's map still work
    page.js("async (name) => { await window.app.extensionManager.setting.set('Comfy.Extension.Disabled', [name]); }",
            EXTENSION)
    try:
        plain = Page(browser, live.server.url)
        for node in workflow["nodes"]:
            if node["type"] == "KSampler":
                node["widgets_values"][0] += 1
            if node["type"] == "KLoRAFuse":
                node["widgets_values"][2] = 0.75  # beta: a new fuse result, not the cached one
        plain.load(workflow)
        plain.page.wait_for_timeout(1000)
        assert plain.js("() => document.querySelectorAll('.klora-preview').length") == 0, "extension not disabled"
        state = plain.js(NODE_STATE, "KLoRAFuse")
        assert [w[0] for w in state["widgets"]] == expected_widgets["KLoRAFuse"][:-1], state["widgets"]
        plain.page.locator("button:has-text('Run')").first.click()
        plain.page.wait_for_function("""() => {
            const fuse = window.app.graph.nodes.find((n) => n.type === 'KLoRAFuse');
            const img = fuse.imgs && fuse.imgs[0];
            return img && img.complete && img.naturalWidth > 0 && img.src.includes('klora_map_');
        }""", timeout=180_000)
        assert plain.js("() => document.querySelectorAll('.klora-preview').length") == 0
        plain.page.mouse.move(2, VIEWPORT["height"] - 2)
        plain.screenshot("browser_5_without_js.png")
        assert not plain.page_errors, plain.page_errors
        plain.page.close()
    finally:
        page.js("async () => { await window.app.extensionManager.setting.set('Comfy.Extension.Disabled', []); }")

    # 6. nothing went wrong on the page
    assert not page.page_errors, page.page_errors
    assert not page.own_console_problems(), page.own_console_problems()
    assert not page.bad_requests, page.bad_requests
    page.page.close()
    print(f"browser test: {time.monotonic() - started:.1f} s, {clicks} clicks, alpha {alpha}, latency "
          f"{latency * 1000:.0f} ms")


LEGACY_WORKFLOW = wt.REPO_ROOT / "tests" / "data" / "workflow_0.1.0_sdxl.json"  # as saved with 0.1.0: beta -1

# Screen position of a widget's left or right arrow in the classic canvas.
WIDGET_ARROW = """([type, name, side]) => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => n.type === type);
    const w = node.widgets.find((w) => w.name === name);
    const h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT || 20;
    const x = side === 'left' ? node.pos[0] + 25 : node.pos[0] + node.size[0] - 25;
    const [sx, sy] = app.canvas.ds.convertOffsetToCanvas([x, node.pos[1] + w.y + h / 2]);
    const rect = app.canvas.canvas.getBoundingClientRect();
    return [sx + rect.left, sy + rect.top];
}"""

WIDGET_VALUE = """([type, name]) => window.app.graph.nodes.find((n) => n.type === type).widgets.find((w) => w.name === name).value"""

# The live map's canvas on screen, the node's bottom on screen and the node's size in graph units.
MAP_BOX = """() => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => n.type === 'KLoRAFuse');
    const el = document.querySelector('.klora-preview');
    const r = el.querySelector('canvas').getBoundingClientRect();
    const c = app.canvas.canvas.getBoundingClientRect();
    const [, bottom] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + node.size[1]]);
    return {left: r.left, top: r.top, width: r.width, height: r.height, rootBottom: el.getBoundingClientRect().bottom,
            nodeBottom: c.top + bottom, size: [node.size[0], node.size[1]],
            legend: el.querySelector('.klora-preview-legend')?.textContent ?? null};
}"""

# RGB of the map canvas at a fraction (fx, fy) of its size.
MAP_PIXEL = """([fx, fy]) => {
    const canvas = document.querySelector('.klora-preview canvas');
    const d = canvas.getContext('2d').getImageData(Math.floor(fx * canvas.width), Math.floor(fy * canvas.height), 1, 1).data;
    return [d[0], d[1], d[2]];
}"""


def _route(live, query: str) -> dict:
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{live.server.url}/klora/preview?{query}", timeout=60) as response:
        return json.loads(response.read())


def _click(page: Page, node_type: str, name: str, side: str = "right") -> None:
    page.page.mouse.click(*page.js(WIDGET_ARROW, [node_type, name, side]))
    page.page.wait_for_timeout(350)  # two clicks must not read as a double click


def _param(state: dict, name: str):
    from urllib.parse import parse_qs

    return parse_qs(state["query"] or "").get(name, [None])[0]


def _settled(page: Page, check, timeout_ms: int = 5000):
    """Wait until ``check(preview)`` holds for the ready preview (it follows edits within a poll or two)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        state = page.preview()
        if state["state"] == "ready" and check(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"preview never settled: {state['state']} {state['caption']!r} {state['query']}")
        page.page.wait_for_timeout(150)


def test_settings_follow_the_graph(live, browser):
    import json

    names, info = live.names, live.object_info
    legacy = wt.adapt_ui(json.loads(LEGACY_WORKFLOW.read_text()), names, info)
    saved = next(n for n in legacy["nodes"] if n["type"] == "KLoRAFuse")["widgets_values"]
    assert saved[2] == -1.0 and saved[6] == 50  # beta -1 and map_steps 50, as 0.1.0 saved them
    page = Page(browser, live.server.url)
    _set_vue_nodes(page, False)
    page.load(legacy)
    first = _settled(page, lambda s: "(from the KSampler)" in s["caption"])

    # A 0.1.0 workflow: beta -1 is shown as the value it always meant, and previews the same.
    assert page.js(WIDGET_VALUE, ["KLoRAFuse", "beta"]) == 0.5
    assert "beta=0.5&" in first["query"], first["query"]
    shown = _route(live, first["query"])
    as_saved = _route(live, first["query"].replace("beta=0.5&", "beta=-1&"))
    assert as_saved["beta"] == shown["beta"] == 0.5 and as_saved["selection"] == shown["selection"]
    assert "α 1.5 · β 0.5 · γ" in first["caption"], first["caption"]

    # map_steps follows the KSampler the fuse feeds (3 steps in the adapted workflow, 50 in the file).
    assert page.js(WIDGET_VALUE, ["KLoRAFuse", "map_steps"]) == wt.SMALL_STEPS
    assert f"map_steps={wt.SMALL_STEPS}" in first["query"] and shown["steps"] == wt.SMALL_STEPS

    # The preview lies inside the node (its size as saved); the legend is there.
    box = page.js(MAP_BOX)
    assert box["rootBottom"] <= box["nodeBottom"] + 2, box
    assert box["legend"] and "subject" in box["legend"] and "style" in box["legend"], box

    # Block labels left of the map (a grey label column, not a map colour), and the hover readout.
    assert page.js(MAP_PIXEL, [0.01, 0.02]) == [0xEC, 0xEC, 0xEC]
    rows, steps = len(shown["keys"]), shown["steps"]
    for row in (0, rows // 2, rows - 1):
        y = box["top"] + (row + 0.5) * box["height"] / rows
        page.page.mouse.move(box["left"] + box["width"] - 2, y)
        page.page.wait_for_timeout(150)
        choice = "subject" if shown["selection"][row][steps - 1] == "1" else "style"
        expected = (f"{shown['keys'][row]} · step {steps - 1} of {steps} (p {(steps - 1) / steps:.2f}) · {choice}")
        hover = page.js("() => document.querySelector('.klora-preview-hover').textContent")
        assert hover == expected, (row, hover, expected)
    page.page.mouse.move(2, VIEWPORT["height"] - 2)

    # The pattern's paper beta follows the pattern: s -> s* gives 1.275, and back gives 0.5.
    _click(page, "KLoRAFuse", "pattern")
    assert page.js(WIDGET_VALUE, ["KLoRAFuse", "pattern"]) == "s*"
    star = _settled(page, lambda s: _param(s, "pattern") == "s*" and "β 1.275" in s["caption"])
    assert page.js(WIDGET_VALUE, ["KLoRAFuse", "beta"]) == 1.275 and "beta=1.275&" in star["query"]
    assert _route(live, star["query"])["beta"] == 1.275
    _click(page, "KLoRAFuse", "pattern", "left")
    _settled(page, lambda s: _param(s, "pattern") == "s" and "β 0.5" in s["caption"])
    # A beta the user chose stays when the pattern changes.
    _click(page, "KLoRAFuse", "beta")
    chosen = page.js(WIDGET_VALUE, ["KLoRAFuse", "beta"])
    assert chosen == pytest.approx(0.525)
    _click(page, "KLoRAFuse", "pattern")
    _settled(page, lambda s: _param(s, "pattern") == "s*" and f"β {chosen:g}" in s["caption"])
    assert page.js(WIDGET_VALUE, ["KLoRAFuse", "beta"]) == chosen

    # The sampler's steps change: map_steps follows.  The user sets map_steps: that is an override.
    _click(page, "KSampler", "steps")
    _settled(page, lambda s: _param(s, "map_steps") == str(wt.SMALL_STEPS + 1) and "(from the KSampler)" in s["caption"])
    _click(page, "KLoRAFuse", "map_steps")
    _click(page, "KLoRAFuse", "map_steps")
    _settled(page, lambda s: _param(s, "map_steps") == str(wt.SMALL_STEPS + 3)
             and f"(map_steps; the KSampler has {wt.SMALL_STEPS + 1})" in s["caption"])
    _click(page, "KSampler", "steps")
    page.page.wait_for_timeout(900)
    assert page.js(WIDGET_VALUE, ["KLoRAFuse", "map_steps"]) == wt.SMALL_STEPS + 3
    saved_graph = page.js("() => window.app.graph.serialize()")
    fuse = next(n for n in saved_graph["nodes"] if n["type"] == "KLoRAFuse")
    assert fuse["properties"].get("klora_map_steps_override") is True  # kept with the workflow
    page.screenshot("browser_6_settings.png")
    assert not page.page_errors and not page.own_console_problems() and not page.bad_requests, (
        page.page_errors, page.own_console_problems(), page.bad_requests)
    page.page.close()

    # The Vue node renderer shows the same values (its inputs are labelled with the widget names).
    switch = Page(browser, live.server.url)
    _set_vue_nodes(switch, True)
    switch.page.close()
    try:
        vue = Page(browser, live.server.url)
        vue.load(legacy)
        _settled(vue, lambda s: "(from the KSampler)" in s["caption"] and "β 0.5" in s["caption"])
        values = vue.js("""() => Object.fromEntries([...document.querySelector('.klora-preview')
                          .closest('[data-node-id]').querySelectorAll('input[aria-label]')]
                          .map((i) => [i.getAttribute('aria-label'), i.value]))""")
        # as numbers: the Vue renderer of ComfyUI 0.8.0's frontend shows them padded ("0.500")
        assert float(values.get("beta", "nan")) == 0.5 and int(values.get("map_steps", -1)) == wt.SMALL_STEPS, values
        height = vue.js("""() => document.querySelector('.klora-preview').closest('[data-node-id]')
                           .getBoundingClientRect().height""")
        assert height < 700, height  # before: a 700-unit node, mostly empty
        assert vue.js("() => document.querySelector('.klora-preview-legend')?.textContent ?? ''")
        vue.screenshot("browser_7_vue_settings.png")
        assert not vue.page_errors and not vue.own_console_problems() and not vue.bad_requests
        vue.page.close()
    finally:
        reset = Page(browser, live.server.url)
        _set_vue_nodes(reset, False)
        reset.page.close()
