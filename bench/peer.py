# SPDX-License-Identifier: GPL-3.0-or-later
"""A reference-style stand-in for timing: K-LoRA the way the authors' code runs it (not their code).

What it copies, for timing only, is the cost model docs/method.md describes
("Where this differs from the authors' code"): at EVERY forward of EVERY targeted
layer it rebuilds both deltas ``up @ down``, runs top-K on both, decides, and
applies the chosen delta; progress is a global counter of layer calls divided
by ``steps x layers``.  It is written here from that description.

Mechanism: ComfyUI's public ``ModelPatcher.add_weight_wrapper(key, f)``.
ComfyUI then casts a copy of the weight at every forward and passes it
through ``f``, which returns ``weight + chosen delta``.

Deliberately generous to the stand-in: gamma is computed once when it is
built (not per call), the call counter is reset at the start of every
sampling run and its denominator is this run's real ``steps x layers``.
"""
from __future__ import annotations

import comfy.lora
import comfy.lora_convert


class PeerState:
    def __init__(self, n_layers: int, alpha: float = 1.5, beta: float = 0.5):
        self.n_layers = n_layers
        self.alpha = alpha
        self.beta = beta
        self.calls = 0
        self.total_calls = 1
        self.gamma = 1.0

    def start(self, steps: int, evals_per_step: int = 1) -> None:
        self.calls = 0
        self.total_calls = max(1, steps * evals_per_step * self.n_layers)

    def progress(self) -> float:
        return min(self.calls / self.total_calls, 1.0)


class PeerLayer:
    """``weight -> weight + chosen delta``, recomputing both deltas and both top-K sums every call."""

    def __init__(self, state: PeerState, subject, style, k: int):
        self.state = state
        self.subject = subject  # (up [out, r], down [r, in], scale)
        self.style = style
        self.k = k

    def __call__(self, weight):
        state = self.state
        state.calls += 1
        up_s, down_s, scale_s = self.subject
        up_t, down_t, scale_t = self.style
        d_s = (up_s @ down_s) * scale_s
        d_t = (up_t @ down_t) * scale_t
        t_s = d_s.abs().flatten().topk(self.k).values.sum()
        t_t = d_t.abs().flatten().topk(self.k).values.sum()
        scale = state.alpha * state.progress() + state.beta
        chosen = d_s if float(t_s / state.gamma) > float(t_t * scale) else d_t
        return weight + chosen.reshape(weight.shape).to(weight.dtype)


def _factors(adapter):
    up, down, alpha, mid, dora, reshape = adapter.weights[:6]
    if mid is not None or dora is not None or reshape is not None:
        raise ValueError("the peer stand-in handles plain LoRA adapters only")
    rank = down.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    return up.flatten(1).float(), down.flatten(1).float(), scale


def attach(model_patcher, subject_sd: dict, style_sd: dict):
    """Return ``(clone with a PeerLayer on every weight both LoRAs cover, PeerState)``."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    subject = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(subject_sd)), key_map, log_missing=False)
    style = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(style_sd)), key_map, log_missing=False)
    shared = sorted(k for k in subject if k in style and isinstance(k, str))
    state = PeerState(len(shared))
    clone = model_patcher.clone()
    ratios = []
    layers = []
    for key in shared:
        fs, ft = _factors(subject[key]), _factors(style[key])
        k = fs[1].shape[0] * ft[1].shape[0]
        layers.append((key, PeerLayer(state, fs, ft, k)))
        ls = float(((fs[0] @ fs[1]) * fs[2]).abs().sum())
        lt = float(((ft[0] @ ft[1]) * ft[2]).abs().sum())
        ratios.append(ls / lt)
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    state.gamma = sum(kept) / len(kept)
    for key, layer in layers:
        clone.add_weight_wrapper(key, layer)
    return clone, state
