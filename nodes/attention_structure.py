# SPDX-License-Identifier: GPL-3.0-or-later
"""Which weights of a loaded ComfyUI model are attention projections, read from the model itself.

Name rules (``klora_core/weight_keys.py``) have to know how every family
spells its projections; the module tree already says it.  Every family in
``comfy/ldm`` implements attention as a module class named after it
(``comfy.ldm.modules.attention.CrossAttention``, ``flux.layers.SelfAttention``,
``wan.model.WanSelfAttention``, ``lumina.model.JointAttention``,
``hidream.model.HiDreamAttention``, ``aura.mmdit.DoubleAttention``,
``kandinsky5.model.CrossAttention``, ``cascade.common.OptimizedAttention`` ...)
whose own Linear (or conv) layers are its q/k/v/out projections, possibly
inside a Sequential/ModuleList (``to_out.0``).  So:

- an *attention module* is one whose class, or a base class, is named
  ``...Attention...``/``...Attn...`` and is not a block, layer, wrapper,
  processor, pooling or norm class (``WanAttentionBlock``, cascade's
  ``AttnBlock`` hold MLPs and mappers too);
- its projections are the Linear/conv layers reached from it through
  containers only (a nested module of another class is judged on its own).

Special case, documented and tested: FLUX-style single-stream blocks
(``SingleStreamBlock`` of FLUX, Chroma, HunyuanVideo) fuse attention and MLP in
``linear1`` (q, k, v, MLP in) and ``linear2`` (out, MLP out), the only place
their attention weights live; both count as attention projections, as the
name rules count them.

:func:`attention_weight_keys` returns None when the structure cannot be read
(no ``diffusion_model`` module, or no attention module found in it): the
caller then falls back to the name rules and says so.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..klora_core.weight_keys import is_attention_projection, weight_name

logger = logging.getLogger(__name__)

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_NOT_ATTENTION_CLASS = re.compile(r"block|layer|wrapper|processor|pool|norm|embed", re.IGNORECASE)
#: Blocks whose attention lives in named Linear children fused with the MLP: {class name: child names}.
FUSED_ATTENTION_CHILDREN = {"SingleStreamBlock": ("linear1", "linear2")}
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def is_attention_class(cls: type) -> bool:
    """True when ``cls`` or one of its base classes is named as an attention module (see module docstring)."""
    for base in cls.__mro__:
        if base in (torch.nn.Module, object):
            continue
        name = base.__name__
        if _ATTENTION_CLASS.search(name) and not _NOT_ATTENTION_CLASS.search(name):
            return True
    return False


def _is_weight_layer(module) -> bool:
    """A Linear or convolution (ComfyUI's ops, GGUF and quantized layers subclass these)."""
    return isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))


def _projection_layers(module, prefix: str):
    """``(path, layer)`` of every Linear/conv reached from ``module`` through containers only."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if _is_weight_layer(child):
            yield path, child
        elif isinstance(child, _CONTAINERS):
            yield from _projection_layers(child, path)


def _fused_layers(module, prefix: str):
    for name in FUSED_ATTENTION_CHILDREN.get(type(module).__name__, ()):
        child = getattr(module, name, None)
        if child is not None and _is_weight_layer(child):
            yield f"{prefix}.{name}", child


def attention_weight_keys(model_patcher, prefix: str = "diffusion_model") -> Optional[frozenset]:
    """State-dict keys (``diffusion_model.<path>.weight``) of every attention projection of the model.

    ``model_patcher``: a ComfyUI ModelPatcher (``.model.diffusion_model`` is read).
    Returns None when the structure cannot be read (see module docstring).
    """
    root = getattr(getattr(model_patcher, "model", None), prefix, None)
    if not isinstance(root, torch.nn.Module):
        logger.debug("no %s module to read attention layers from", prefix)
        return None
    keys = set()
    for path, module in root.named_modules(prefix=prefix):
        if is_attention_class(type(module)):
            layers = _projection_layers(module, path)
        else:
            layers = _fused_layers(module, path)
        keys.update(f"{layer_path}.weight" for layer_path, _ in layers)
    if not keys:
        logger.debug("no attention module found in %s (%s)", prefix, type(root).__name__)
        return None
    return frozenset(keys)


SOURCE_STRUCTURE = "the model's structure"
SOURCE_NAMES = "weight names (the model's structure could not be read)"


@dataclass(frozen=True)
class AttentionRule:
    """The attention test the Fuse node uses for one model.

    ``keys``: attention projection weight keys read from the model, or None
    (then the name rules decide); ``source``: which of the two, for the report.
    """

    keys: Optional[frozenset]
    source: str

    def is_projection(self, unit) -> bool:
        """Is the weight of ``unit`` (a key or ``(key, offset)`` unit) an attention projection?"""
        if self.keys is None:
            return is_attention_projection(unit)
        return weight_name(unit) in self.keys

    def looks_like_attention(self, unit) -> bool:
        """Either rule says attention projection (used to flag what is left unswitched)."""
        return self.is_projection(unit) or is_attention_projection(unit)


def attention_rule(model_patcher) -> AttentionRule:
    """The model's structure where it can be read, else the name rules (logged once per call)."""
    try:
        keys = attention_weight_keys(model_patcher)
    except Exception as exc:  # an unexpected module tree must not stop a fuse: names still work
        logger.warning("K-LoRA: reading attention layers from the model failed (%s: %s); using weight names",
                       type(exc).__name__, exc)
        keys = None
    if keys is None:
        logger.info("K-LoRA: attention projections are recognised by weight names")
        return AttentionRule(None, SOURCE_NAMES)
    return AttentionRule(keys, SOURCE_STRUCTURE)
