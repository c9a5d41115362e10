"""A brute-force K-LoRA reference for quantized weights (fp8, scaled fp8, GGUF), rounding as the host does.

:class:`HostRoundedBruteForce` is :class:`support.brute_force.BruteForce`
(the choice from the plain spec reference, progress by bisection) with one
change: at every model call each targeted weight is rebuilt as

    W = host_round(W0 + (strength * alpha / rank) * (up @ down))      in float32

- ``W0``: the unpatched weight as ComfyUI turns it into float32 before
  patching (``comfy.model_patcher.ModelPatcher.patch_weight_to_device``: cast
  to float32, then the layer's ``convert_weight`` if it has one, e.g. scaled
  fp8's ``weight * scale``); for a GGUF model, the reference model holds the
  values dequantized by the gguf package (tests/support/quantized_files.py).
- the delta in float32 exactly as ComfyUI's LoRA adapter computes it
  (``comfy/weight_adapter/lora.py``: ``torch.mm(up, down)`` scaled by
  ``strength * alpha / rank``), so the values before rounding are the host's.
- ``host_round``: the host's own rounding and storing, which is not code under
  test: the layer's ``set_weight(W, seed=...)`` where it has one (scaled fp8),
  else ``comfy.float.stochastic_rounding(W, storage dtype, seed=
  comfy.model_patcher.string_to_seed(name))`` (fp8: seeded stochastic
  rounding; float16: round to nearest; float32: nothing).  ``storage_dtypes``
  names a storage dtype that differs from the reference model's own (a GGUF F16
  weight in a float32 reference model).

The reference model is a separate load of the same file (fp8) or a float32
model of the dequantized GGUF weights; its own patch list stays empty.
"""
from __future__ import annotations

import torch

from support import brute_force


class HostRoundedBruteForce(brute_force.BruteForce):
    """See the module docstring; arguments as BruteForce (one K-LoRA pair) plus ``storage_dtypes``."""

    def __init__(self, family, seed, subject_truth, style_truth, strengths=(1.0, 1.0), storage_dtypes=None,
                 patcher=None, **kwargs):
        import comfy.model_management
        import comfy.model_patcher

        super().__init__(family, seed, subject_truth, style_truth, strengths=strengths, patcher=patcher, **kwargs)
        self.storage_dtypes = dict(storage_dtypes or {})
        self.factors = []  # per side: {unit: (up32 [out, r], down32 [r, in], strength * alpha / rank)}
        for truth, strength in ((subject_truth, strengths[0]), (style_truth, strengths[1])):
            side = {}
            for key, entries in truth.items():
                for up, down, scale, offset in entries:
                    assert offset is None, "HostRoundedBruteForce handles whole-weight LoRAs only"
                    side[key] = (up.to(torch.float32).flatten(1), down.to(torch.float32).flatten(1),
                                 strength * scale)
            self.factors.append(side)
        self.w0_32 = {}
        for name in self.params:
            weight, _, convert_func = comfy.model_patcher.get_key_weight(self.model, name)
            w = comfy.model_management.cast_to_device(weight, torch.device("cpu"), torch.float32, copy=True)
            self.w0_32[name] = convert_func(w, inplace=True) if convert_func is not None else w

    def _set_weights(self, p: float) -> None:
        subject, style = self.factors
        plan = self.plan
        for name, w0 in self.w0_32.items():
            if name in subject and name in style:
                up, down, scale = (subject if plan.uses_subject(name, p) else style)[name]
            else:
                up, down, scale = (subject if name in subject else style)[name]
            w = w0.clone()
            w += (scale * torch.mm(up, down)).reshape(w.shape)
            self._store(name, w)

    @torch.no_grad()
    def _store(self, name: str, w: torch.Tensor) -> None:
        import comfy.float
        import comfy.model_patcher
        import comfy.utils

        weight, set_func, _ = comfy.model_patcher.get_key_weight(self.model, name)
        seed = comfy.model_patcher.string_to_seed(name)
        if set_func is not None:
            set_func(w, inplace_update=False, seed=seed)
            return
        rounded = comfy.float.stochastic_rounding(w, self.storage_dtypes.get(name, weight.dtype), seed=seed)
        comfy.utils.set_attr_param(self.model, name, rounded.to(weight.dtype))
