"""An independent brute-force K-LoRA sampler for tests.

A separate copy of the tiny model (same seed, so bit-identical base weights)
gets ``W0 + chosen delta`` rebuilt from scratch in float64 at EVERY model call,
from the LoRA factory's truth tensors and the plain reference in
klora_reference.py (written from docs/method.md).  It shares no code with the pack: progress is found by
a plain bisection on the model's ``percent_to_sigma``, taken as exactly
``i / N`` when it lies on the grid of the run's full N-step schedule; in step-count mode it is the index within the pass.
"""
from __future__ import annotations

import torch

from support import family_models
from support import klora_reference


def units_of(truth: dict, strength: float) -> dict:
    """``{unit: (up64 * scale * strength, down64)}``; unit = key or (key, offset)."""
    out = {}
    for key, entries in truth.items():
        for up, down, s, offset in entries:
            unit = key if offset is None else (key, tuple(offset))
            out[unit] = (up.to(torch.float64).flatten(1) * (s * strength), down.to(torch.float64).flatten(1))
    return out


def _name(unit):
    return unit if isinstance(unit, str) else unit[0]


def merge_mismatched_layouts(subject: dict, style: dict, rows: dict) -> None:
    """In place: a weight both cover with different unit sets becomes one whole-weight unit per side.

    The side's slices are stacked into block factors (up [rows, sum r], down [sum r, in]) whose
    product is the whole weight's delta, so the reference rank is the sum of the slices' ranks.
    """
    names_s = {_name(u) for u in subject}
    names_t = {_name(u) for u in style}
    for name in names_s & names_t:
        units_s = {u for u in subject if _name(u) == name}
        units_t = {u for u in style if _name(u) == name}
        if units_s == units_t:
            continue
        for side, units in ((subject, units_s), (style, units_t)):
            parts = [(u, side.pop(u)) for u in sorted(units, key=str)]
            total = sum(up.shape[1] for _, (up, _) in parts)
            up_full = torch.zeros((rows[name], total), dtype=torch.float64)
            downs, col = [], 0
            for u, (up, down) in parts:
                start, length = (0, rows[name]) if isinstance(u, str) else (u[1][1], u[1][2])
                up_full[start:start + length, col:col + up.shape[1]] = up
                downs.append(down)
                col += up.shape[1]
            side[name] = (up_full, torch.cat(downs))


class BruteForce:
    """Reference model: sample with ``comfy.sample.sample(self.patcher, ...)``.

    Args:
        family, seed: the tiny model to copy (any family of ``family_models.FAMILIES``).
        subject_truth, style_truth: LoRA factory truths.
        strengths: (subject, style).
        alpha, beta, pattern: schedule.
        measure: "noise level" or "step count".
        full_sigmas: the whole schedule of the run (noise-level mode), 1-D.
    """

    def __init__(self, family, seed, subject_truth, style_truth, strengths=(1.0, 1.0), alpha=1.5, beta=0.5,
                 pattern="s", measure="noise level", full_sigmas=None, extras=(), more_pairs=(), patcher=None):
        """``extras``: [(truth, strength)] always applied (plain LoRAs);
        ``more_pairs``: [(subject_truth, style_truth, (s_strength, t_strength), alpha, beta, pattern)]
        further K-LoRA pairs stacked on the same weights; ``patcher``: a prepared base model to use."""
        self.patcher = patcher if patcher is not None else family_models.build_model(family, seed)
        self.model = self.patcher.model
        self.pairs = []
        for truth_s, truth_t, (ss, st), a, b, pat in [(subject_truth, style_truth, strengths, alpha, beta, pattern),
                                                      *more_pairs]:
            subject, style = units_of(truth_s, ss), units_of(truth_t, st)
            rows = {name: p.shape[0] for name, p in self.model.named_parameters() if p.dim()}
            merge_mismatched_layouts(subject, style, rows)
            self.pairs.append((subject, style, klora_reference.reference_plan(subject, style, a, b, pat)))
        self.subject, self.style, self.plan = self.pairs[0]
        self.extras = [units_of(truth, strength) for truth, strength in extras]
        self.measure = measure
        self.full_sigmas = None if full_sigmas is None else [float(s) for s in full_sigmas]
        self.pass_sigmas = None
        params = dict(self.model.named_parameters())
        all_units = [u for subject, style, _ in self.pairs for u in list(subject) + list(style)]
        all_units += [u for extra in self.extras for u in extra]
        keys = {u if isinstance(u, str) else u[0] for u in all_units}
        self.params = {k: params[k] for k in keys}
        self.w0 = {k: p.detach().to(torch.float64).clone() for k, p in self.params.items()}
        self.progress_log = []
        self.patcher.set_model_unet_function_wrapper(self._wrapper)

    # progress --------------------------------------------------------------
    def _percent(self, sigma: float) -> float:
        ms = self.model.model_sampling
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = (lo + hi) / 2
            if float(ms.percent_to_sigma(mid)) > sigma:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def progress(self, sigma: float) -> float:
        if self.measure == "step count":
            sig = self.pass_sigmas
            index = max(sum(1 for s in sig[:-1] if s >= sigma) - 1, 0)
            return index / (len(sig) - 1)
        p = self._percent(sigma)
        if self.full_sigmas is not None:
            n = len(self.full_sigmas) - 1
            if abs(p * n - round(p * n)) < 1e-3:  # a point of a uniform full schedule: exactly i / N
                return round(p * n) / n
        return p

    # weights ---------------------------------------------------------------
    def _set_weights(self, p: float) -> None:
        new = {k: w.clone() for k, w in self.w0.items()}
        chosen_deltas = []
        for subject, style, plan in self.pairs:
            for unit in set(subject) | set(style):
                if unit in subject and unit in style:
                    chosen_deltas.append((unit, (subject if plan.uses_subject(unit, p) else style)[unit]))
                else:
                    chosen_deltas.append((unit, (subject if unit in subject else style)[unit]))
        for extra in self.extras:
            chosen_deltas.extend(extra.items())
        for unit, delta in chosen_deltas:
            key = unit if isinstance(unit, str) else unit[0]
            view = new[key] if isinstance(unit, str) else new[key].narrow(*unit[1])
            view += (delta[0] @ delta[1]).reshape(view.shape)
        with torch.no_grad():
            for k, w in new.items():
                self.params[k].copy_(w.to(self.params[k].dtype))

    def _wrapper(self, apply_model, args):
        sigma = float(args["timestep"].flatten()[0])
        p = self.progress(sigma)
        self.progress_log.append(p)
        self._set_weights(p)
        return apply_model(args["input"], args["timestep"], **args["c"])


def sample_reference(model_patcher, family, subject_truth, style_truth, steps: int, scheduler: str):
    """``(latent, BruteForce)``: the brute-force run of ``family`` (family_models.sample, seed 0) at the
    default schedule, its full sigma schedule taken from ``model_patcher``'s own sampling object."""
    import comfy.samplers

    full = comfy.samplers.calculate_sigmas(model_patcher.get_model_object("model_sampling"), scheduler, steps)
    ref = BruteForce(family, 0, subject_truth, style_truth, full_sigmas=full)
    return family_models.sample(ref.patcher, family, steps=steps, scheduler=scheduler), ref
