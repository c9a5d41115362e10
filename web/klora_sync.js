// K-LoRA Fusion: keeping "K-LoRA Fuse"'s beta and map_steps in step with the graph (used by klora.js).
// SPDX-License-Identifier: GPL-3.0-or-later
//
// beta: the node's default is pattern s's paper value (0.5); switching the
// pattern to s* moves a beta still at s's value to s*'s (1.275) and back.  A
// beta below 0 (0.1.0 workflows: -1 meant "the pattern's value") is shown as
// that value: the run is the same, since the server resolves it identically.
// The values come from /klora/options (klora_core/options.py), never typed here.
//
// map_steps: while "K-LoRA Fuse" feeds a KSampler (directly, through Reroutes
// or through other MODEL nodes), map_steps follows that sampler's steps.  A
// map_steps the user sets to another value is an override, kept in the node's
// properties (saved with the workflow) until the user sets it back.

export const OVERRIDE_PROPERTY = "klora_map_steps_override";
const MAX_HOPS = 8;

export function typeOf(node) {
  return node?.comfyClass ?? node?.type;
}

export function findWidget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

// Sets a widget the way a user edit does: the value, then the widget's callback.  In the Vue node
// renderer that callback is the frontend's wrapper, which also updates what the node shows.
function setWidget(node, widget, value) {
  widget.value = value;
  try {
    widget.callback?.(value);
  } catch (error) {
    console.warn("[K-LoRA preview]", error);
  }
  node.setDirtyCanvas?.(true, true);
}

// Returns true when it changed beta.  state.pattern remembers the pattern last seen (undefined: none yet).
export function syncBeta(node, state, patternBeta) {
  const pattern = findWidget(node, "pattern")?.value;
  const beta = findWidget(node, "beta");
  if (!beta || !patternBeta || !(pattern in patternBeta) || typeof beta.value !== "number") return false;
  let target = null;
  if (beta.value < 0) target = patternBeta[pattern];
  else if (state.pattern !== undefined && state.pattern !== pattern && state.pattern in patternBeta
           && Math.abs(beta.value - patternBeta[state.pattern]) < 1e-9) target = patternBeta[pattern];
  state.pattern = pattern;
  if (target === null || target === beta.value) return false;
  setWidget(node, beta, target);
  return true;
}

function linkById(graph, id) {
  const links = graph?.links;
  return graph?.getLink?.(id) ?? links?.get?.(id) ?? links?.[id] ?? null;
}

// The first node downstream of the fuse's MODEL output that has a "steps" widget and a model input.
export function linkedSampler(node) {
  const graph = node.graph;
  const seen = new Set([node.id]);
  let frontier = [node];
  for (let hop = 0; hop < MAX_HOPS && frontier.length; hop++) {
    const next = [];
    for (const current of frontier) {
      for (const output of current.outputs ?? []) {
        if (output.type !== "MODEL" && typeOf(current) !== "Reroute") continue;
        for (const id of output.links ?? []) {
          const target = graph?.getNodeById?.(linkById(graph, id)?.target_id);
          if (!target || seen.has(target.id)) continue;
          seen.add(target.id);
          if (findWidget(target, "steps") && target.inputs?.some((input) => input.type === "MODEL")) return target;
          next.push(target);
        }
      }
    }
    frontier = next;
  }
  return null;
}

// Follows the linked sampler's steps unless overridden; returns {sampler, samplerSteps, override}.
// state.mapStepsSeen: the map_steps value last seen (undefined: take the current one as it is).
export function syncMapSteps(node, state, range) {
  const widget = findWidget(node, "map_steps");
  const sampler = linkedSampler(node);
  const samplerSteps = findWidget(sampler, "steps")?.value;
  node.properties = node.properties ?? {};
  let override = node.properties[OVERRIDE_PROPERTY] === true;
  if (!widget) return { sampler, samplerSteps, override };
  const usable = Number.isInteger(samplerSteps) && (!range || (samplerSteps >= range.min && samplerSteps <= range.max));
  if (state.mapStepsSeen !== undefined && widget.value !== state.mapStepsSeen && usable) {
    override = widget.value !== samplerSteps; // the user changed map_steps: an override unless it matches
    node.properties[OVERRIDE_PROPERTY] = override;
  }
  if (usable && !override && widget.value !== samplerSteps) {
    state.mapStepsSeen = samplerSteps; // set here, not by the user
    setWidget(node, widget, samplerSteps);
  }
  state.mapStepsSeen = widget.value;
  return { sampler: usable ? sampler : null, samplerSteps, override };
}
