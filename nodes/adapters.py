# SPDX-License-Identifier: GPL-3.0-or-later
"""What K-LoRA reads from ComfyUI's weight adapters (``comfy.weight_adapter``), in one place.

ComfyUI's LoRA parser turns each LoRA module into an adapter object;
``LoRAAdapter.weights`` is the tuple ``(up, down, alpha, mid, dora_scale,
reshape)`` (comfy/weight_adapter/lora.py).  Only this module unpacks it: the
rest of the pack asks :func:`lora_factors` (the raw tuple, named) or
:func:`factors_of` (a plain low-rank LoRA as ``up @ down * scale``), and
:func:`dense_delta` for any other adapter (LoHa, LoKr, DoRA, diff patches).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

import comfy.lora
from comfy.weight_adapter.lora import LoRAAdapter

from ..klora_core.weight_keys import weight_name
from .patcher_backup import original_weight
from .quantized import dequantized, is_gguf_quantized
from .units import is_parts, parts_patch_list, unit_offset


class LoRAFactors(NamedTuple):
    """A LoRAAdapter's tensors: up [out, r(, 1, 1)], down [r, in(, kh, kw)], alpha (scalar or None),
    mid (LoCon [r, r, kh, kw] or None), dora_scale (or None), reshape (target shape or None)."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: object
    mid: Optional[torch.Tensor]
    dora_scale: Optional[torch.Tensor]
    reshape: object


def lora_factors(value) -> Optional[LoRAFactors]:
    """The factors of a LoRA patch value (``LoRAAdapter``), or None for any other adapter or legacy tuple."""
    if isinstance(value, LoRAAdapter):
        return LoRAFactors(*value.weights[:6])
    return None


def factors_of(value):
    """``(up, down, scale, rank)`` of a plain LoRA patch, or None for anything else."""
    factors = lora_factors(value)
    if factors is not None and factors.mid is None and factors.dora_scale is None and factors.reshape is None:
        rank = int(factors.down.shape[0])
        scale = 1.0 if factors.alpha is None else float(factors.alpha) / rank
        return factors.up, factors.down, scale, rank
    return None


def adapter_rank(value, dense: torch.Tensor) -> int:
    """Rank used for K when a delta is dense (LoHa, LoKr, DoRA, LoCon with mid, diff patches).

    The inner dimension of the adapter's factors where it has one; otherwise the
    smaller side of the 2-D delta (K then covers most of the weight).
    """
    weights = getattr(value, "weights", None)
    name = getattr(value, "name", "")
    try:
        if name == "lora":
            return int(weights[1].shape[0])
        if name == "loha":
            return int(weights[1].shape[0])
        if name == "lokr":
            for factor in (weights[6], weights[4]):  # w2_b, w1_b
                if factor is not None:
                    return int(factor.shape[0])
    except (TypeError, IndexError, AttributeError):
        pass
    flat = dense.reshape(dense.shape[0], -1) if dense.dim() > 1 else dense.reshape(1, -1)
    return int(min(flat.shape))


@torch.no_grad()
def dense_delta(value, unit_key, model_patcher, device) -> torch.Tensor:
    """The delta of any patch value at strength 1, by patching a float32 copy and subtracting."""
    name = weight_name(unit_key)
    offset, function = unit_offset(unit_key)
    weight, convert_func = original_weight(model_patcher, name)
    if is_gguf_quantized(weight):  # packed bytes: ComfyUI-GGUF's own dequantization, logical shape
        base = dequantized(weight, name, device)
    else:
        base = weight.to(device=device, dtype=torch.float32, copy=True)
    if convert_func is not None:
        base = convert_func(base, inplace=True)
    if is_parts(value):  # the whole weight, all of this side's slices
        patched = comfy.lora.calculate_weight(parts_patch_list(value, 1.0), base.clone(), name)
    else:
        patched = comfy.lora.calculate_weight([(1.0, value, 1.0, offset, function)], base.clone(), name)
    delta = patched - base
    if offset is not None:
        delta = delta.narrow(offset[0], offset[1], offset[2])
    return delta
