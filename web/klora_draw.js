// K-LoRA Fusion: drawing the live selection map on "K-LoRA Fuse" (used by klora.js).
// SPDX-License-Identifier: GPL-3.0-or-later
//
// The map is drawn on a <canvas>: rows = weights (model order), columns =
// sampling steps, blue = subject delta, orange = style delta (the Okabe-Ito
// colours of the server-side map, klora_core/render.py).  A label column on
// the left names the blocks (the groups of the preview answer), as the map
// drawn after a run does; the legend is HTML above the canvas.  cellAt()
// turns a pointer position into (row, step) for the hover readout.

export const SUBJECT_COLOR = [0x00, 0x72, 0xb2]; // #0072B2
export const STYLE_COLOR = [0xe6, 0x9f, 0x00]; // #E69F00
const LABEL_FONT_PX = 11; // CSS pixels: readable at 100 % zoom
const LABEL_MAX_CSS = 130;
const LABEL_BG = "#ececec";
const LABEL_FG = "#222";

const hex = (rgb) => `#${rgb.map((c) => c.toString(16).padStart(2, "0")).join("")}`;

// The legend: "■ subject delta  ■ style delta".
export function legendElement() {
  const legend = document.createElement("div");
  legend.className = "klora-preview-legend";
  legend.style.cssText = "flex:0 0 auto;display:flex;gap:12px;align-items:center;white-space:nowrap;";
  for (const [rgb, text] of [[SUBJECT_COLOR, "subject delta (S)"], [STYLE_COLOR, "style delta (T)"]]) {
    const item = document.createElement("span");
    item.style.cssText = "display:inline-flex;gap:4px;align-items:center;";
    const swatch = document.createElement("span");
    swatch.style.cssText = `display:inline-block;width:11px;height:11px;border-radius:2px;background:${hex(rgb)};`;
    item.append(swatch, document.createTextNode(text));
    legend.append(item);
  }
  return legend;
}

// Device pixels per CSS pixel of the canvas as shown: the screen's ratio times the canvas zoom (the
// node is drawn scaled by the graph canvas), so labels stay sharp at any zoom.
export function pixelRatio(canvas) {
  const shown = canvas.getBoundingClientRect?.().width;
  const zoom = shown && canvas.clientWidth ? shown / canvas.clientWidth : 1;
  return Math.min(4, Math.max(0.5, (window.devicePixelRatio || 1) * zoom));
}

// Width of the block-label column in CSS pixels (0 when the labels would not fit).
function labelColumn(ctx, payload, cssWidth, cssHeight, ratio) {
  const groups = payload.groups ?? [];
  if (!groups.length || cssWidth < 160) return 0;
  const rowCss = cssHeight / payload.selection.length;
  if (!groups.some((g) => g.count * rowCss >= LABEL_FONT_PX)) return 0;
  ctx.font = `${LABEL_FONT_PX * ratio}px sans-serif`;
  const widest = Math.max(...groups.map((g) => ctx.measureText(g.name).width)) / ratio;
  return Math.min(LABEL_MAX_CSS, Math.ceil(widest) + 8, Math.floor(cssWidth * 0.4));
}

// Draws the payload; returns the geometry cellAt() needs (CSS pixels).
export function drawMap(canvas, payload) {
  const rows = payload.selection;
  const steps = payload.steps;
  const ratio = pixelRatio(canvas);
  const cssWidth = canvas.clientWidth;
  const cssHeight = canvas.clientHeight;
  const width = Math.max(1, Math.round(cssWidth * ratio));
  const height = Math.max(1, Math.round(cssHeight * ratio));
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  if (!rows.length || !steps) return null;
  const labelCss = labelColumn(ctx, payload, cssWidth, cssHeight, ratio);
  const x0 = Math.round(labelCss * ratio);
  const mapWidth = width - x0;
  // One pixel per cell, scaled up without smoothing: exact colours at any size.
  const cells = new ImageData(steps, rows.length);
  rows.forEach((row, r) => {
    for (let i = 0; i < steps; i++) {
      const [red, green, blue] = row[i] === "1" ? SUBJECT_COLOR : STYLE_COLOR;
      const at = (r * steps + i) * 4;
      cells.data.set([red, green, blue, 255], at);
    }
  });
  const bitmap = document.createElement("canvas");
  bitmap.width = steps;
  bitmap.height = rows.length;
  bitmap.getContext("2d").putImageData(cells, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(bitmap, x0, 0, mapWidth, height);
  const cellW = mapWidth / steps;
  const cellH = height / rows.length;
  ctx.fillStyle = "rgba(255,255,255,0.9)"; // column gaps when cells are wide enough
  if (cellW >= 12) for (let i = 1; i < steps; i++) ctx.fillRect(x0 + Math.round(i * cellW) - 1, 0, 1, height);
  if (labelCss) {
    ctx.fillStyle = LABEL_BG;
    ctx.fillRect(0, 0, x0, height);
  }
  const groups = payload.groups ?? [];
  ctx.textBaseline = "middle";
  ctx.font = `${LABEL_FONT_PX * ratio}px sans-serif`;
  groups.forEach((group, index) => {
    const top = Math.round(group.start * cellH);
    if (index > 0) {
      ctx.fillStyle = "rgba(40,40,40,0.6)"; // a rule between blocks
      ctx.fillRect(0, top, width, Math.max(1, Math.round(ratio)));
    }
    if (labelCss && group.count * cellH >= LABEL_FONT_PX * ratio) {
      ctx.fillStyle = LABEL_FG;
      ctx.fillText(group.name, 4 * ratio, top + (group.count * cellH) / 2, x0 - 6 * ratio);
    }
  });
  return { x0: labelCss, cellW: cellW / ratio, cellH: cellH / ratio, rows: rows.length, steps };
}

// The (row, step) under a pointer at CSS offset (x, y) in the canvas, or null.
export function cellAt(geometry, x, y) {
  if (!geometry || x < geometry.x0) return null;
  const step = Math.floor((x - geometry.x0) / geometry.cellW);
  const row = Math.floor(y / geometry.cellH);
  if (step < 0 || step >= geometry.steps || row < 0 || row >= geometry.rows) return null;
  return { row, step };
}

// "down_blocks_0_…_attn1_to_q · step 7 of 20 (p 0.35) · style": the hover readout of one cell.
export function describeCell(payload, cell) {
  const key = payload.keys[cell.row];
  const choice = payload.selection[cell.row][cell.step] === "1" ? "subject" : "style";
  const p = (cell.step / payload.steps).toFixed(2);
  return `${key} · step ${cell.step} of ${payload.steps} (p ${p}) · ${choice}`;
}
