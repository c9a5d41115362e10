# SPDX-License-Identifier: GPL-3.0-or-later
"""Quantized model weights as K-LoRA sees them (GGUF via ComfyUI-GGUF; fp8), feature-detected.

ComfyUI-GGUF keeps a quantized weight as a tensor of its own class whose
storage is the packed bytes (Q8_0 (320, 768) is uint8 (320, 816)) and which
carries ``tensor_type`` (the GGML type, with ``.name``) and ``tensor_shape``
(the logical shape).  ``model_state_dict()`` holds packed placeholders, so
shapes are read from the parameter.  ComfyUI-GGUF dequantizes and patches such
a weight at every forward (and ignores ComfyUI's weight wrappers there), so a
K-LoRA switch in its patch list is read live and is never re-baked.  fp8 and
scaled fp8 weights are ordinary tensors of their real shape, baked and rounded
by ComfyUI itself: nothing here is needed for them.  Why and how it was
verified: docs/quantized-models.md.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch

import comfy.utils

from ..klora_core.errors import KLoRAError

#: GGML tensor types ComfyUI-GGUF keeps as plain torch tensors (baked like any weight).
GGUF_PLAIN_TYPES = ("F32", "F16")

#: Report text for weights ComfyUI-GGUF patches at every forward.
GGUF_LIVE_NOTE = "live: GGUF weights are patched at every forward by ComfyUI-GGUF"


def gguf_type(tensor) -> Optional[str]:
    """The GGML type name of a ComfyUI-GGUF tensor (``"Q8_0"``, ``"F16"``, ...), None for any other tensor."""
    qtype = getattr(tensor, "tensor_type", None)
    if qtype is None or getattr(tensor, "tensor_shape", None) is None:
        return None
    return str(getattr(qtype, "name", qtype))


def is_gguf_quantized(tensor) -> bool:
    """True for a ComfyUI-GGUF tensor stored quantized (packed bytes that are dequantized at every forward)."""
    kind = gguf_type(tensor)
    return kind is not None and kind not in GGUF_PLAIN_TYPES


def logical_shape(tensor) -> torch.Size:
    """The shape the weight has in the model (a GGUF tensor's ``tensor_shape``, else ``tensor.shape``)."""
    shape = getattr(tensor, "tensor_shape", None) if gguf_type(tensor) is not None else None
    return torch.Size(shape) if shape is not None else tensor.shape


def storage_note(tensor) -> str:
    """How a weight is stored, for error messages: ``" (GGUF Q4_0, packed as 320x432 bytes)"``, ``""`` for float."""
    kind = gguf_type(tensor)
    if kind is not None:
        if kind in GGUF_PLAIN_TYPES:
            return f" (GGUF {kind})"
        packed = "x".join(str(n) for n in tensor.size())  # size(): the storage shape (``shape`` is overridden)
        return f" (GGUF {kind}, packed as {packed} bytes)"
    dtype = getattr(tensor, "dtype", None)
    if dtype is not None and "float8" in str(dtype):
        return f" ({str(dtype).replace('torch.', '')})"
    return ""


def model_weight(model_patcher, name: str):
    """The parameter ``name`` (e.g. ``"diffusion_model.x.weight"``) of the patcher's model, or None."""
    try:
        return comfy.utils.get_attr(model_patcher.model, name)
    except AttributeError:
        return None


def host_patches_live(model_patcher, name: str) -> bool:
    """True when the host applies the patches of weight ``name`` at every forward (a quantized GGUF weight).

    Such a weight is never baked, so a K-LoRA switch in its patch list is read
    live and re-baking it would be pointless.
    """
    return is_gguf_quantized(model_weight(model_patcher, name))


def host_live_weights(model_patcher, names: Iterable[str]) -> frozenset:
    """The subset of weight ``names`` whose patches the host applies at every forward."""
    return frozenset(name for name in names if host_patches_live(model_patcher, name))


def is_gguf_model(model_patcher) -> bool:
    """True when any weight of the model is GGUF-quantized (a model loaded by ComfyUI-GGUF's UNet loaders)."""
    return any(is_gguf_quantized(p) for p in model_patcher.model.parameters())


@torch.no_grad()
def dequantized(tensor, name: str, device, dtype=torch.float32) -> torch.Tensor:
    """A plain ``dtype`` copy of a quantized GGUF weight, in its logical shape, on ``device``.

    Uses the dequantizer of the package that made the tensor (ComfyUI-GGUF's
    ``dequantize_tensor``, the arithmetic its layers use at every forward),
    else the ``gguf`` package's ``gguf.quants.dequantize``.
    """
    maker = sys.modules.get(type(tensor).__module__)
    dequantize = getattr(maker, "dequantize_tensor", None)
    if callable(dequantize):
        plain = dequantize(tensor, dtype).as_subclass(torch.Tensor)  # drop the pack's tensor class
        return plain.to(device=device, dtype=dtype).reshape(logical_shape(tensor))
    try:
        import gguf.quants  # the package ComfyUI-GGUF requires
    except ImportError:
        raise KLoRAError(f"weight {name} is GGUF {gguf_type(tensor)}-quantized and no GGUF dequantizer is "
                         "available (install the 'gguf' package that ComfyUI-GGUF requires)") from None
    packed = tensor.as_subclass(torch.Tensor).detach().cpu().numpy()
    values = torch.from_numpy(gguf.quants.dequantize(packed, tensor.tensor_type).copy())
    return values.reshape(logical_shape(tensor)).to(device=device, dtype=dtype)
