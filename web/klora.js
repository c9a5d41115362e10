// K-LoRA Fusion: live selection-map preview on "K-LoRA Fuse" nodes.
// SPDX-License-Identifier: GPL-3.0-or-later
//
// While the user edits alpha, beta, pattern, scope or map_steps on a K-LoRA
// Fuse node (or lora_name/strength on the two loader nodes feeding it), this
// extension asks the pack's HTTP route /klora/preview (nodes/routes.py) for the
// selection matrix, debounced by DEBOUNCE_MS, and draws it on the node in a
// DOM widget: rows = weights, columns = sampling steps, blue = subject delta,
// orange = style delta (the Okabe-Ito colours of the server-side map). No
// prompt is queued.
//
// Optional by design: the nodes, their outputs and the map shown after a run
// (ui.images) work without this file. Everything here is feature-detected and
// wrapped so that a frontend without some API (the Vue node frontend, an
// older or newer release) just gets no live preview. Only documented hooks are
// used: registerExtension's nodeCreated / loadedGraphNode / setup, chained
// widget callbacks and a chained per-instance onConnectionsChange; nothing on a
// prototype is replaced.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "klora.fusion.preview";
const FUSE = "KLoRAFuse";
const SUBJECT_LOADER = "KLoRASubjectLoader";
const STYLE_LOADER = "KLoRAStyleLoader";
const FUSE_WIDGETS = ["pattern", "alpha", "beta", "scope", "map_steps"];
const LOADER_WIDGETS = ["lora_name", "strength"];
const WIDGET_NAME = "klora_preview";
const DEBOUNCE_MS = 200;
const POLL_MS = 400; // catches edits that bypass widget callbacks (other frontends, undo, loads)
const SUBJECT_COLOR = [0x00, 0x72, 0xb2]; // #0072B2
const STYLE_COLOR = [0xe6, 0x9f, 0x00]; // #E69F00
const LOG = "[K-LoRA preview]";

// Per-node state, kept outside the node object (nothing is added to LiteGraph's objects but the widget).
const states = new Map(); // node -> state

function typeOf(node) {
  return node?.comfyClass ?? node?.type;
}

function widgetValue(node, name) {
  const widget = node?.widgets?.find((w) => w.name === name);
  return widget ? widget.value : undefined;
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

function createState(node) {
  const root = document.createElement("div");
  root.className = "klora-preview";
  root.dataset.kloraState = "idle";
  root.style.cssText =
    "display:flex;flex-direction:column;gap:3px;width:100%;height:100%;box-sizing:border-box;" +
    "padding:2px 4px;font:11px sans-serif;color:var(--input-text,#ddd);overflow:hidden;";
  const canvas = document.createElement("canvas");
  canvas.className = "klora-preview-map";
  canvas.style.cssText = "flex:1 1 auto;min-height:40px;width:100%;image-rendering:pixelated;border-radius:3px;";
  const caption = document.createElement("div");
  caption.className = "klora-preview-caption";
  caption.style.cssText = "flex:0 0 auto;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;opacity:0.9;";
  caption.textContent = "K-LoRA live preview";
  root.append(canvas, caption);
  return { node, root, canvas, caption, timer: null, lastQuery: null, payload: null, seq: 0, abort: null };
}

function setCaption(state, text, isError = false) {
  state.caption.textContent = text;
  state.caption.title = text;
  state.caption.style.color = isError ? "var(--error-text,#f88)" : "";
}

function describe(payload) {
  const c = payload.counts;
  const gamma = payload.gamma == null ? "n/a" : Number(payload.gamma).toPrecision(4);
  return (
    `γ ${gamma} · ${c.weights} weights · ${payload.steps} steps · ` +
    `step 0: ${c.first_step.subject} S / ${c.first_step.style} T · ` +
    `last: ${c.last_step.subject} S / ${c.last_step.style} T`
  );
}

function draw(state) {
  const { canvas, payload } = state;
  if (!payload) return;
  const rows = payload.selection;
  const steps = payload.steps;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  if (!rows.length || !steps) return;
  // One pixel per cell, scaled up without smoothing: exact colours at any size.
  const cells = new ImageData(steps, rows.length);
  rows.forEach((row, r) => {
    for (let i = 0; i < steps; i++) {
      const [red, green, blue] = row[i] === "1" ? SUBJECT_COLOR : STYLE_COLOR;
      const at = (r * steps + i) * 4;
      cells.data[at] = red;
      cells.data[at + 1] = green;
      cells.data[at + 2] = blue;
      cells.data[at + 3] = 255;
    }
  });
  const bitmap = document.createElement("canvas");
  bitmap.width = steps;
  bitmap.height = rows.length;
  bitmap.getContext("2d").putImageData(cells, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(bitmap, 0, 0, width, height);
  // Column gaps when cells are wide enough, and a rule between blocks.
  const cellW = width / steps;
  ctx.fillStyle = "rgba(255,255,255,0.9)";
  if (cellW >= 12) for (let i = 1; i < steps; i++) ctx.fillRect(Math.round(i * cellW) - 1, 0, 1, height);
  const cellH = height / rows.length;
  ctx.fillStyle = "rgba(40,40,40,0.55)";
  if (payload.groups?.length > 1 && height / payload.groups.length >= 4) {
    for (const group of payload.groups.slice(1)) ctx.fillRect(0, Math.round(group.start * cellH), width, 1);
  }
}

async function fetchPreview(state) {
  state.timer = null;
  const node = state.node;
  if (!states.has(node)) return;
  const request = previewRequest(node);
  if (request.problem) {
    state.lastQuery = null;
    state.payload = null;
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
    if (!response.ok || !body || body.error) {
      state.payload = null;
      state.root.dataset.kloraState = "error";
      setCaption(state, `Preview: ${body?.error?.message ?? `HTTP ${response.status}`}`, true);
      return;
    }
    state.payload = body;
    draw(state);
    setCaption(state, describe(body));
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

function watchWidgets(node, names, onChange) {
  for (const widget of node.widgets ?? []) {
    if (names.includes(widget.name)) widget.callback = chain(widget.callback, onChange);
  }
}

function attachPreview(node) {
  if (states.has(node) || typeof node.addDOMWidget !== "function") return;
  const state = createState(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "klora.preview", state.root, {
    serialize: false, // never part of widgets_values nor of the API prompt
    hideOnZoom: false,
    getMinHeight: () => 120,
    getMaxHeight: () => 240, // leaves the rest of the node to the map image shown after a run
  });
  if (widget) widget.serialize = false;
  states.set(node, state);
  watchWidgets(node, FUSE_WIDGETS, () => kick(node));
  node.onConnectionsChange = chain(node.onConnectionsChange, () => kick(node));
  const resizes = typeof ResizeObserver === "function" ? new ResizeObserver(() => draw(state)) : null;
  resizes?.observe(state.canvas);
  node.onRemoved = chain(node.onRemoved, () => {
    if (state.timer) clearTimeout(state.timer);
    state.abort?.abort();
    resizes?.disconnect();
    states.delete(node);
  });
  kick(node);
}

function poll() {
  for (const [node, state] of states) {
    if (state.timer) continue;
    if (!node.graph) {
      states.delete(node); // removed without onRemoved (e.g. the whole graph was replaced)
      continue;
    }
    const request = previewRequest(node);
    const query = request.problem ? null : request.query;
    if (query !== state.lastQuery || (request.problem && state.root.dataset.kloraState !== "unavailable")) kick(node);
  }
}

app.registerExtension({
  name: EXTENSION,
  setup() {
    if (!api?.fetchApi) return;
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
    } catch (error) {
      console.warn(LOG, "live preview disabled on this node:", error);
    }
  },
  loadedGraphNode(node) {
    try {
      if (states.has(node)) kick(node);
    } catch (error) {
      console.warn(LOG, error);
    }
  },
});
