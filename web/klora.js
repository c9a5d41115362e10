// K-LoRA Fusion: live selection map, run report and settings help on "K-LoRA Fuse" nodes.
// SPDX-License-Identifier: GPL-3.0-or-later
//
// While the user edits alpha, beta, pattern, scope or map_steps on a K-LoRA
// Fuse node (or lora_name/strength on the two loader nodes feeding it), this
// extension asks the pack's HTTP route /klora/preview (nodes/routes.py) for the
// selection matrix, debounced by DEBOUNCE_MS, and draws it on the node in a
// DOM widget (klora_draw.js): a legend, block labels, the map, a hover readout
// (weight, step, choice) and a caption with the resolved alpha/beta and gamma.
// No prompt is queued.  After a run, the report the node returns is shown
// under the map, with its line breaks.  beta follows the pattern and map_steps
// the linked KSampler's steps (klora_sync.js).
//
// Optional by design: the nodes, their outputs and the map shown after a run
// (ui.images) work without this file. Everything here is feature-detected and
// wrapped so that a frontend without some API (an older or newer release)
// just gets less help. Only documented hooks are used: registerExtension's
// nodeCreated / loadedGraphNode / setup, the api's "executed" event, chained
// widget callbacks and a chained per-instance onConnectionsChange; nothing on
// a prototype is replaced.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { cellAt, describeCell, drawMap, legendElement, pixelRatio } from "./klora_draw.js";
import { findWidget, syncBeta, syncMapSteps, typeOf } from "./klora_sync.js";

const EXTENSION = "klora.fusion.preview";
const FUSE = "KLoRAFuse";
const SUBJECT_LOADER = "KLoRASubjectLoader";
const STYLE_LOADER = "KLoRAStyleLoader";
const FUSE_WIDGETS = ["pattern", "alpha", "beta", "scope", "map_steps"];
const LOADER_WIDGETS = ["lora_name", "strength"];
const WIDGET_NAME = "klora_preview";
const DEBOUNCE_MS = 200;
const POLL_MS = 400; // catches edits that bypass widget callbacks (other frontends, undo, loads)
const BUSY_RETRY_MS = 700; // the route answers 503 "busy" while it scores another pair
const MAP_MIN_PX = 110;
const MAP_MAX_PX = 260;
const TEXT_PX = 60; // legend, hover line and two caption lines
const REPORT_MAX_PX = 240; // the whole report of a typical run, without scrolling
const LOG = "[K-LoRA preview]";

// Per-node state, kept outside the node object (nothing is added to LiteGraph's objects but the widget
// and, for a map_steps override, one entry in node.properties).
const states = new Map(); // node -> state
let options = null; // /klora/options: {pattern_beta, beta, map_steps}

function widgetValue(node, name) {
  return findWidget(node, name)?.value;
}

function chain(original, extra) {
  return function (...args) {
    const result = original?.apply(this, args);
    try {
      extra.apply(this, args);
    } catch (error) {
      console.warn(LOG, error);
    }
    return result;
  };
}

function sourceNode(node, inputName) {
  const slot = node.inputs?.findIndex((input) => input.name === inputName) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null || typeof node.getInputNode !== "function") return null;
  let source = node.getInputNode(slot);
  // Follow legacy "Reroute" nodes (native link reroutes are resolved by getInputNode itself).
  for (let hops = 0; source && typeOf(source) === "Reroute" && hops < 32; hops++) {
    source = typeof source.getInputNode === "function" ? source.getInputNode(0) : null;
  }
  return source ?? null;
}

// The request for a fuse node, or {problem} when the preview cannot be computed.
function previewRequest(node) {
  const subject = sourceNode(node, "subject");
  const style = sourceNode(node, "style");
  if (typeOf(subject) !== SUBJECT_LOADER || typeOf(style) !== STYLE_LOADER) {
    return { problem: "Live preview: connect 'Load Subject LoRA' and 'Load Style LoRA' directly." };
  }
  const params = {
    subject: widgetValue(subject, "lora_name"),
    style: widgetValue(style, "lora_name"),
    subject_strength: widgetValue(subject, "strength"),
    style_strength: widgetValue(style, "strength"),
    pattern: widgetValue(node, "pattern"),
    alpha: widgetValue(node, "alpha"),
    beta: widgetValue(node, "beta"),
    scope: widgetValue(node, "scope"),
    map_steps: widgetValue(node, "map_steps"),
  };
  if (!params.subject || !params.style) return { problem: "Live preview: choose both LoRA files." };
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
  }
  return { query: query.toString() };
}

function line(className, css = "") {
  const element = document.createElement("div");
  element.className = className;
  element.style.cssText = "flex:0 0 auto;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;" + css;
  return element;
}

function createState(node) {
  const root = document.createElement("div");
  root.className = "klora-preview";
  root.dataset.kloraState = "idle";
  root.style.cssText =
    "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;box-sizing:border-box;" +
    "padding:2px 4px;font:11px sans-serif;color:var(--input-text,#ddd);overflow:hidden;";
  const canvas = document.createElement("canvas");
  canvas.className = "klora-preview-map";
  canvas.style.cssText = `flex:1 1 auto;min-height:${MAP_MIN_PX - 20}px;width:100%;image-rendering:pixelated;` +
    "border-radius:3px;cursor:crosshair;";
  const hover = line("klora-preview-hover", "min-height:13px;opacity:0.95;");
  const caption = line("klora-preview-caption", "white-space:pre;opacity:0.9;");
  caption.textContent = "K-LoRA live preview";
  const report = document.createElement("pre");
  report.className = "klora-report";
  report.style.cssText = `flex:0 0 auto;display:none;margin:2px 0 0;padding:3px 4px;max-height:${REPORT_MAX_PX}px;` +
    "overflow:auto;white-space:pre-wrap;font:10.5px/1.3 monospace;background:rgba(0,0,0,0.25);border-radius:3px;";
  root.append(legendElement(), canvas, hover, caption, report);
  return { node, root, canvas, hover, caption, report, geometry: null, timer: null, lastQuery: null,
           payload: null, seq: 0, abort: null, steps: null };
}

function setCaption(state, text, isError = false) {
  state.caption.textContent = text;
  state.caption.title = text;
  state.caption.style.color = isError ? "var(--error-text,#f88)" : "";
}

const fmt = (x) => Number(Number(x).toPrecision(4)).toString();

function describe(state, payload) {
  const c = payload.counts;
  const gamma = payload.gamma == null ? "n/a" : fmt(payload.gamma);
  const s = state.steps;
  const source = s?.sampler ? (s.override ? ` (map_steps; the KSampler has ${s.samplerSteps})` : " (from the KSampler)") : "";
  return (
    `${payload.pattern} · α ${fmt(payload.alpha)} · β ${fmt(payload.beta)} · γ ${gamma} · ` +
    `${c.weights} weights · ${payload.steps} steps${source}\n` +
    `step 0: ${c.first_step.subject} subject / ${c.first_step.style} style · ` +
    `last: ${c.last_step.subject} subject / ${c.last_step.style} style`
  );
}

function draw(state) {
  state.geometry = state.payload ? drawMap(state.canvas, state.payload) : null;
  state.drawnRatio = pixelRatio(state.canvas);
}

function showHover(state, event) {
  const cell = state.payload && cellAt(state.geometry, event.offsetX, event.offsetY);
  state.hover.textContent = cell ? describeCell(state.payload, cell) : "";
  state.hover.title = state.hover.textContent;
  state.root.dataset.kloraHover = cell ? `${cell.row},${cell.step}` : "";
}

async function fetchPreview(state) {
  state.timer = null;
  const node = state.node;
  if (!states.has(node)) return;
  const request = previewRequest(node);
  if (request.problem) {
    state.lastQuery = null;
    state.payload = null;
    state.geometry = null;
    state.root.dataset.kloraState = "unavailable";
    setCaption(state, request.problem);
    const ctx = state.canvas.getContext("2d");
    ctx.clearRect(0, 0, state.canvas.width, state.canvas.height);
    return;
  }
  if (request.query === state.lastQuery && state.root.dataset.kloraState !== "error") return;
  state.lastQuery = request.query;
  state.abort?.abort();
  const abort = typeof AbortController === "function" ? new AbortController() : null;
  state.abort = abort;
  const seq = ++state.seq;
  state.root.dataset.kloraState = "loading";
  try {
    const response = await api.fetchApi(`/klora/preview?${request.query}`, { signal: abort?.signal });
    const body = await response.json().catch(() => null);
    if (seq !== state.seq) return; // a newer request is on its way
    if (response.status === 503 && body?.error?.type === "busy") {
      state.lastQuery = null; // not answered yet: ask again shortly
      state.timer = setTimeout(() => fetchPreview(state), BUSY_RETRY_MS);
      return;
    }
    if (!response.ok || !body || body.error) {
      state.payload = null;
      state.root.dataset.kloraState = "error";
      setCaption(state, `Preview: ${body?.error?.message ?? `HTTP ${response.status}`}`, true);
      return;
    }
    state.payload = body;
    draw(state);
    setCaption(state, describe(state, body));
    state.root.dataset.kloraQuery = request.query;
    state.root.dataset.kloraSubjectPerStep = body.counts.subject_per_step.join(",");
    state.root.dataset.kloraState = "ready";
  } catch (error) {
    if (error?.name === "AbortError" || seq !== state.seq) return;
    state.root.dataset.kloraState = "error";
    setCaption(state, `Preview unavailable: ${error?.message ?? error}`, true);
  }
}

function kick(node) {
  const state = states.get(node);
  if (!state) return;
  if (state.timer) clearTimeout(state.timer);
  state.timer = setTimeout(() => fetchPreview(state), DEBOUNCE_MS);
}

function kickAllFuseNodes() {
  for (const node of states.keys()) kick(node);
}

function syncAllFuseNodes() {
  for (const [node, state] of states) if (syncSettings(node, state)) kick(node);
}

function watchWidgets(node, names, onChange) {
  for (const widget of node.widgets ?? []) {
    if (names.includes(widget.name)) widget.callback = chain(widget.callback, onChange);
  }
}

// Keeps beta and map_steps in step with the pattern and the linked sampler; true when a value changed.
function syncSettings(node, state) {
  if (state.syncing) return false; // a value set here runs the widget callbacks, which come back here
  state.syncing = true;
  try {
    const before = [widgetValue(node, "beta"), widgetValue(node, "map_steps")];
    syncBeta(node, state, options?.pattern_beta);
    state.steps = syncMapSteps(node, state, options?.map_steps);
    return before[0] !== widgetValue(node, "beta") || before[1] !== widgetValue(node, "map_steps");
  } finally {
    state.syncing = false;
  }
}

function widgetHeight(state) {
  const report = state.report.style.display === "none" ? 0 : Math.min(REPORT_MAX_PX, state.report.scrollHeight + 8);
  return { min: MAP_MIN_PX + TEXT_PX + report, max: MAP_MAX_PX + TEXT_PX + report };
}

// Grows (never shrinks) the node so the widgets, the map, the report and the run's map image fit.
function fitNode(node, extra = 0) {
  const size = node.computeSize?.();
  if (!size || typeof node.setSize !== "function") return;
  const height = size[1] + extra;
  if (node.size[1] < height || node.size[0] < size[0]) node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], height)]);
  node.setDirtyCanvas?.(true, true);
}

function showReport(node, text) {
  const state = states.get(node);
  if (!state || typeof text !== "string" || !text) return;
  state.report.textContent = text;
  state.report.style.display = "block";
  state.root.dataset.kloraReport = "shown";
  fitNode(node, 280); // and room for the run's map image, which the frontend draws below the widgets
}

function attachPreview(node) {
  if (states.has(node) || typeof node.addDOMWidget !== "function") return;
  const state = createState(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "klora.preview", state.root, {
    serialize: false, // never part of widgets_values nor of the API prompt
    hideOnZoom: false,
    getMinHeight: () => widgetHeight(state).min,
    getMaxHeight: () => widgetHeight(state).max,
  });
  if (widget) widget.serialize = false;
  const beta = findWidget(node, "beta");
  if (beta?.options) {
    beta.options.min = 0; // below 0 only for 0.1.0 workflows, shown as the pattern's value
    // Three decimals: s*'s paper value is 1.275, which the frontend's default (two, from the step) rounds off.
    beta.options.round = 0.001;
    beta.options.precision = 3;
  }
  states.set(node, state);
  watchWidgets(node, FUSE_WIDGETS, () => {
    syncSettings(node, state);
    kick(node);
  });
  node.onConnectionsChange = chain(node.onConnectionsChange, () => kick(node));
  state.canvas.addEventListener("pointermove", (event) => showHover(state, event));
  state.canvas.addEventListener("pointerleave", (event) => showHover(state, event));
  const resizes = typeof ResizeObserver === "function" ? new ResizeObserver(() => draw(state)) : null;
  resizes?.observe(state.canvas);
  node.onRemoved = chain(node.onRemoved, () => {
    if (state.timer) clearTimeout(state.timer);
    state.abort?.abort();
    resizes?.disconnect();
    states.delete(node);
  });
  if (node.size && typeof node.setSize === "function" && node.computeSize) node.setSize(node.computeSize());
  kick(node);
}

function poll() {
  for (const [node, state] of states) {
    if (state.timer) continue;
    if (!node.graph) {
      states.delete(node); // removed without onRemoved (e.g. the whole graph was replaced)
      continue;
    }
    const changed = syncSettings(node, state);
    const request = previewRequest(node);
    const query = request.problem ? null : request.query;
    if (changed || query !== state.lastQuery ||
        (request.problem && state.root.dataset.kloraState !== "unavailable")) kick(node);
    else if (state.payload && state.root.dataset.kloraState === "ready") {
      setCaption(state, describe(state, state.payload));
      if (pixelRatio(state.canvas) !== state.drawnRatio) draw(state); // the graph canvas was zoomed
    }
  }
}

function onExecuted(event) {
  const detail = event?.detail;
  const id = detail?.display_node ?? detail?.node;
  const node = id == null ? null : app.graph?.getNodeById?.(id);
  if (!node || typeOf(node) !== FUSE) return;
  const text = detail.output?.text;
  showReport(node, Array.isArray(text) ? text.join("\n") : text);
}

app.registerExtension({
  name: EXTENSION,
  async setup() {
    if (!api?.fetchApi) return;
    try {
      const response = await api.fetchApi("/klora/options");
      if (response.ok) options = await response.json();
    } catch (error) {
      console.warn(LOG, "no /klora/options; beta and map_steps are left as they are", error);
    }
    api.addEventListener?.("executed", (event) => {
      try {
        onExecuted(event);
      } catch (error) {
        console.warn(LOG, error);
      }
    });
    setInterval(() => {
      try {
        poll();
      } catch (error) {
        console.warn(LOG, error);
      }
    }, POLL_MS);
  },
  nodeCreated(node) {
    try {
      if (!api?.fetchApi) return;
      const type = typeOf(node);
      if (type === FUSE) attachPreview(node);
      else if (type === SUBJECT_LOADER || type === STYLE_LOADER) watchWidgets(node, LOADER_WIDGETS, kickAllFuseNodes);
      else if (findWidget(node, "steps")) watchWidgets(node, ["steps"], syncAllFuseNodes); // map_steps follows
    } catch (error) {
      console.warn(LOG, "live preview disabled on this node:", error);
    }
  },
  loadedGraphNode(node) {
    try {
      const state = states.get(node);
      if (!state) return;
      state.pattern = undefined; // the loaded values are the baseline, not edits
      state.mapStepsSeen = undefined;
      syncSettings(node, state);
      kick(node);
    } catch (error) {
      console.warn(LOG, error);
    }
  },
});
