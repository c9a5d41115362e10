# SPDX-License-Identifier: GPL-3.0-or-later
"""Re-baking many switched weights at once, with exactly ComfyUI's arithmetic.

ComfyUI bakes a weight in ``ModelPatcher.patch_weight_to_device``: a copy of
the original in the LoRA compute dtype ``T`` (float32; newer versions ask
``model_management.lora_compute_dtype``), then per LoRA patch
``view += ((strength * alpha / rank) * (up @ down)).to(T)`` (``view``: the
patch's slice of a fused weight, or all of it), then
``comfy.float.stochastic_rounding(result, weight dtype, seed of the key)``.

:func:`plan_job` reads one weight's patch list and returns the same work as
a :class:`WeightJob` (its LoRA ops), or None where only ComfyUI's own
per-weight path reproduces it bit for bit (a patcher subclass, quantized or
converted weights, other patches on the weight, LoHa/LoKr/DoRA/LoCon-mid,
non-numeric alpha ...).  :func:`bake_jobs` then does the work of many jobs
together: the ``up @ down`` products of equal shape in one ``torch.bmm``
(checked once per shape and device to equal ``torch.mm`` bit for bit, else
per product), the scales in one multiply, and for a plain float weight the
add and the write-back fused in one ``torch.add(..., out=weight)``.  Every
operation is the one ComfyUI performs, in the same order, so the results are
identical to the last bit (tests/test_flips.py holds them to it).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

import comfy.float
import comfy.model_management
import comfy.model_patcher
import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter

from . import adapters  # module import: adapters -> patching -> rebake -> here is a cycle
from .patcher_backup import original_of
from .switch import KLoRASwitch
from .units import is_parts

#: Weight dtypes whose rounding ComfyUI does in ``comfy.float.stochastic_rounding``.
_PLAIN_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED = _PLAIN_FLOATS + tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

#: The key -> seed function of the stochastic rounding (moved from model_patcher to utils in newer ComfyUI).
_string_to_seed = getattr(comfy.utils, "string_to_seed", None) or getattr(comfy.model_patcher, "string_to_seed", None)

#: (device type, out, rank, in) -> whether ``torch.bmm`` equals ``torch.mm`` bit for bit there.
_BMM_EXACT: dict = {}


class LoRAOp(NamedTuple):
    """One LoRA delta of a weight: ``view += (scale * (up @ down)).reshape(view)``.

    offset: ``(dim, start, length)`` of the slice it lands in, or None for the whole weight;
    up [out, r] and down [r, in] (flattened, any float dtype, any device); scale: the
    Python float ComfyUI multiplies by, ``strength * (alpha / rank)`` (``strength`` when
    alpha is None)."""

    offset: Optional[tuple]
    up: torch.Tensor
    down: torch.Tensor
    scale: float


class WeightJob(NamedTuple):
    """name: model key; original: the unpatched weight (``ModelPatcher.backup``), any device;
    ops: the LoRA deltas in patch order; seed: ComfyUI's rounding seed for the key."""

    name: str
    original: torch.Tensor
    ops: tuple
    seed: int


def compute_dtype(device) -> torch.dtype:
    """The dtype ComfyUI patches weights in on ``device`` (float32 before lora_compute_dtype existed)."""
    chooser = getattr(comfy.model_management, "lora_compute_dtype", None)
    return chooser(device) if chooser is not None else torch.float32


def uses_comfy_patching(patcher) -> bool:
    """True when ``patcher`` bakes weights with ComfyUI's own ``ModelPatcher.patch_weight_to_device``."""
    method = getattr(type(patcher), "patch_weight_to_device", None)
    return method is comfy.model_patcher.ModelPatcher.patch_weight_to_device and _string_to_seed is not None


def _lora_op(value, strength: float, offset, function) -> Optional[LoRAOp]:
    """The op of one plain LoRA patch value at ``strength``, or None when ComfyUI does more than that."""
    factors = adapters.lora_factors(value)
    if (factors is None or type(value).calculate_weight is not LoRAAdapter.calculate_weight or function is not None
            or factors.mid is not None or factors.dora_scale is not None or factors.reshape is not None):
        return None
    alpha = factors.alpha
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        return None  # a tensor alpha multiplies as a tensor in ComfyUI: other rounding
    rank = factors.down.shape[0]
    alpha_term = alpha / rank if alpha is not None else 1.0  # ComfyUI: v[2] / mat2.shape[0]
    return LoRAOp(offset, factors.up.flatten(1), factors.down.flatten(1), strength * alpha_term)


def _switch_ops(entry) -> Optional[list]:
    """The ops one patch entry ``(strength, value, strength_model, offset, function)`` adds, or None."""
    strength, value, strength_model, offset, function = entry
    if not isinstance(value, KLoRASwitch) or strength_model != 1.0 or function is not None:
        return None
    chosen, chosen_strength = value.chosen()
    chosen_strength *= strength  # as KLoRASwitch.calculate_weight
    if chosen_strength == 0.0:
        return []
    if not is_parts(chosen):
        op = _lora_op(chosen, chosen_strength, offset, None)
        return None if op is None else [op]
    if offset is not None:
        return None
    ops = []
    for unit_key, part in chosen[1]:
        part_offset = None if isinstance(unit_key, str) else (unit_key[1] if len(unit_key) > 1 else None)
        part_function = None if isinstance(unit_key, str) or len(unit_key) < 3 else unit_key[2]
        op = _lora_op(part, chosen_strength, part_offset, part_function)
        if op is None:
            return None
        ops.append(op)
    return ops


def plan_job(patcher, name: str) -> Optional[WeightJob]:
    """The batched form of re-baking ``name`` now, or None where ComfyUI's per-weight path must do it."""
    original = original_of(patcher, name)
    if original is None or not uses_comfy_patching(patcher) or name in getattr(patcher, "hook_backup", {}):
        return None
    weight, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, name)
    if (set_func is not None or convert_func is not None or type(weight) not in (torch.Tensor, torch.nn.Parameter)
            or type(original) not in (torch.Tensor, torch.nn.Parameter) or weight.dtype not in _SUPPORTED
            or original.dtype != weight.dtype or original.shape != weight.shape):
        return None
    ops = []
    for entry in patcher.patches.get(name, ()):
        entry_ops = _switch_ops(entry)
        if entry_ops is None:
            return None
        ops.extend(entry_ops)
    return WeightJob(name, original, tuple(ops), _string_to_seed(name))


def _delta_shape(op: LoRAOp) -> tuple:
    return op.up.shape[0], op.up.shape[1], op.down.shape[1]


def _bmm_exact(device: torch.device, u: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``torch.bmm`` gave ``torch.mm``'s bits for the first product (checked once per shape/device)."""
    key = (device.type, device.index, *u.shape[1:], d.shape[2])
    if key not in _BMM_EXACT:
        _BMM_EXACT[key] = torch.equal(torch.mm(u[0], d[0]), out[0])
    return _BMM_EXACT[key]


def _stacked(tensors: list, device) -> torch.Tensor:
    """``tensors`` (equal shapes) as one float32 [n, ...] tensor on ``device`` (exact casts)."""
    source = tensors[0].device
    if any(t.device != source for t in tensors):
        tensors = [t.to(device) for t in tensors]
    return torch.stack([t.to(torch.float32) for t in tensors]).to(device)


def _scaled_deltas(ops: list, device, workspace: torch.Tensor) -> list:
    """``[scale * (up @ down)]`` float32 on ``device`` for ``ops`` (views into ``workspace``), grouped by shape."""
    by_shape: dict = {}
    for index, op in enumerate(ops):
        by_shape.setdefault(_delta_shape(op), []).append(index)
    deltas = [None] * len(ops)
    start = 0
    for (rows, rank, cols), members in by_shape.items():
        count = len(members)
        out = workspace[start:start + count * rows * cols].view(count, rows, cols)
        start += count * rows * cols
        # ComfyUI: cast_to_device(up / down, device, float32); stacked where they are, moved in one copy each.
        ups = _stacked([ops[i].up for i in members], device)
        downs = _stacked([ops[i].down for i in members], device)
        torch.bmm(ups, downs, out=out)
        if not _bmm_exact(torch.device(device), ups, downs, out):
            for slot in range(count):
                torch.mm(ups[slot], downs[slot], out=out[slot])
        scales = torch.tensor([ops[i].scale for i in members], dtype=torch.float32, device=device)
        out.mul_(scales.view(count, 1, 1))  # ComfyUI: (strength * alpha) * lora_diff, in float32
        for slot, index in enumerate(members):
            deltas[index] = out[slot]
    return deltas


def _finish(job: WeightJob, deltas: list, target: torch.Tensor, temp_dtype: torch.dtype) -> None:
    """Write ``original + deltas`` into ``target`` the way ComfyUI rounds it."""
    original = job.original
    if original.device != target.device:
        original = original.to(target.device)
    if (temp_dtype == torch.float32 and target.dtype in _PLAIN_FLOATS and len(job.ops) == 1
            and job.ops[0].offset is None):
        # The add in float32 and the rounding to the weight's dtype, in one pass over memory.
        torch.add(deltas[0].view(target.shape), original, out=target)
        return
    temp = original.to(temp_dtype, copy=True)
    for op, delta in zip(job.ops, deltas):
        view = temp.narrow(*op.offset) if op.offset is not None else temp
        view += delta.reshape(view.shape).to(temp_dtype)
    target.copy_(comfy.float.stochastic_rounding(temp, target.dtype, seed=job.seed))


@torch.no_grad()
def bake_jobs(jobs: list, targets: list, workspace_for, chunk_bytes: int) -> None:
    """Bake ``jobs`` into ``targets`` (same order; a target is the weight itself or a fresh tensor like it).

    ``workspace_for(device, numel)`` returns a float32 buffer of at least ``numel``
    elements on ``device``; jobs are taken in chunks whose deltas fit ``chunk_bytes``
    (at least one job per chunk).
    """
    index = 0
    while index < len(jobs):
        device = targets[index].device
        chunk, numel = [], 0
        while index < len(jobs) and targets[index].device == device:
            size = sum(op.up.shape[0] * op.down.shape[1] for op in jobs[index].ops)
            if chunk and (numel + size) * 4 > chunk_bytes:
                break
            chunk.append(index)
            numel += size
            index += 1
        ops = [op for i in chunk for op in jobs[i].ops]
        deltas = _scaled_deltas(ops, device, workspace_for(device, numel)) if ops else []
        temp_dtype = compute_dtype(device)
        at = 0
        for i in chunk:
            count = len(jobs[i].ops)
            _finish(jobs[i], deltas[at:at + count], targets[i], temp_dtype)
            at += count
