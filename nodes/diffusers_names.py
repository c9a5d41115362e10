# SPDX-License-Identifier: GPL-3.0-or-later
"""Module names LoRA trainers write for each model family, in the diffusers layout (ComfyUI glue).

ComfyUI's models keep each family's original layout (``blocks.0.self_attn.q``
for Wan, ``double_blocks.0.img_attn.qkv`` for HunyuanVideo), while diffusers,
PEFT and the trainers built on them (diffusers' scripts, SimpleTuner,
finetrainers, OneTrainer, ai-toolkit for some families) name the modules of
the diffusers port of the same model (``blocks.0.attn1.to_q``,
``transformer_blocks.0.attn.to_q`` = a third of that fused ``qkv``).
:func:`diffusers_module_names` gives, for the model at hand, ``{diffusers
module path: key-map value}`` where the value is what ComfyUI's key maps hold:
a weight key, ``(key, (dim, start, length))`` for a slice of a fused weight, or
``(key, None, function)``.  The caller (nodes/comfy_key_map.py) adds the
prefixes trainers put in front (:data:`DIT_PREFIXES`, :data:`UNDERSCORED_PREFIXES`).

The correspondence is written from each family's architecture (ComfyUI's
``comfy/ldm/<family>`` module tree against the diffusers module tree); the
family is recognised by ComfyUI model class (feature-detected: classes a
ComfyUI version lacks are skipped), every name is kept only when its target
weight exists in the model, and fused-weight slices take their widths from
the model's own weights (Lumina 2's grouped-query k/v are narrower than q).
docs/families.md lists the names per family.
"""
from __future__ import annotations

import re

import comfy.model_base
import comfy.utils

from ..klora_core.name_aliases import port_name


#: Prefixes trainers put before diffusers module names of a DiT: bare (PEFT's
#: ``get_peft_model_state_dict``), ``transformer.`` (diffusers ``save_lora_weights``),
#: ``diffusion_model.`` (ai-toolkit for some families), saved PeftModels.
DIT_PREFIXES = ("", "transformer.", "diffusion_model.", "base_model.model.", "base_model.model.transformer.",
                "transformer.base_model.model.")
#: The same for SD1.5/SDXL UNets (``unet.`` instead of ``transformer.``).
UNET_PREFIXES = ("", "unet.", "base_model.model.", "base_model.model.unet.", "unet.base_model.model.")
#: Prefixes written before the name with every ``.`` as ``_``: kohya-style trainers
#: built on diffusers modules (musubi-tuner's Z-Image: ``lora_unet_layers_0_attention_to_q``),
#: OneTrainer (``lora_transformer_``), SimpleTuner's LyCORIS (``lycoris_``).
UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

_PREFIX = "diffusion_model."


def _weight_paths(model_keys) -> dict:
    """``{module path: weight key}`` of every ``diffusion_model.<path>.weight`` key."""
    return {k[len(_PREFIX):-len(".weight")]: k for k in model_keys
            if k.startswith(_PREFIX) and k.endswith(".weight")}


def _renamed(model_keys, rules) -> dict:
    """``{diffusers path: weight key}`` by the first ``(regex, template)`` rule that fully matches a path."""
    out = {}
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    for path, key in _weight_paths(model_keys).items():
        for pattern, template in compiled:
            m = pattern.fullmatch(path)
            if m:
                out[m.expand(template)] = key
                break
    return out


def _split_rows(key: str, names, widths) -> dict:
    """``{name: (key, (0, start, width))}``: consecutive row slices of fused weight ``key``."""
    out, start = {}, 0
    for name, width in zip(names, widths):
        out[name] = (key, (0, start, width))
        start += width
    return out


def _from_comfy_table(function_name: str, model, model_keys) -> dict:
    """Names from one of ComfyUI's own ``comfy.utils.<family>_to_diffusers`` tables (when it exists)."""
    table_of = getattr(comfy.utils, function_name, None)
    if table_of is None:
        return {}
    out = {}
    for name, target in table_of(model.model_config.unet_config, output_prefix=_PREFIX).items():
        key = target if isinstance(target, str) else target[0]
        if name.endswith(".weight") and key in model_keys:
            out[name[: -len(".weight")]] = target
    return out


def _identity(model, model_keys) -> dict:
    """Families whose ComfyUI module tree IS the diffusers one (HiDream, Qwen-Image, Kandinsky 5)."""
    return dict(_weight_paths(model_keys))


def _port_names(model_keys, family: str, identity: bool = False) -> dict:
    """``{port path: weight key}`` by klora_core's one-to-one renames of ``family``; ``identity``: every
    weight also under its ComfyUI path (ports that rename only a few modules)."""
    out = {}
    for path, key in _weight_paths(model_keys).items():
        if identity:
            out[path] = key
        name = port_name(family, path)
        if name is not None:
            out[name] = key
    return out


# HunyuanVideo outside the FLUX-like double/single blocks: embedders and the text token refiner.
_REFINER = r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."
_REFINER_TO = r"context_embedder.token_refiner.refiner_blocks.\1."
_HUNYUAN_RULES = (
    (r"img_in\.proj", "x_embedder.proj"),
    (r"txt_in\.input_embedder", "context_embedder.proj_in"),
    (r"txt_in\.t_embedder\.in_layer", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    (r"txt_in\.t_embedder\.out_layer", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    (r"txt_in\.c_embedder\.in_layer", "context_embedder.time_text_embed.text_embedder.linear_1"),
    (r"txt_in\.c_embedder\.out_layer", "context_embedder.time_text_embed.text_embedder.linear_2"),
    (_REFINER + r"self_attn\.proj", _REFINER_TO + "attn.to_out.0"),
    (_REFINER + r"mlp\.0", _REFINER_TO + "ff.net.0.proj"),
    (_REFINER + r"mlp\.2", _REFINER_TO + "ff.net.2"),
    (_REFINER + r"adaLN_modulation\.1", _REFINER_TO + "norm_out.linear"),
)


def _hunyuan_video(model, model_keys) -> dict:
    """Double/single blocks as FLUX's diffusers port (ComfyUI's flux table), then the rest.

    The token refiner's fused ``self_attn.qkv`` splits into three equal ``attn.to_q/k/v``.
    """
    out = _from_comfy_table("flux_to_diffusers", model, model_keys)
    out.update(_renamed(model_keys, _HUNYUAN_RULES))
    sd = model.state_dict()
    for path, key in _weight_paths(model_keys).items():
        m = re.fullmatch(_REFINER + r"self_attn\.qkv", path)
        if m:
            names = [m.expand(_REFINER_TO + f"attn.to_{c}") for c in "qkv"]
            out.update(_split_rows(key, names, [sd[key].shape[0] // 3] * 3))
    return out


_LUMINA_BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.attention\.qkv")


def _lumina(model, model_keys) -> dict:
    """Lumina 2 and Z-Image (one ComfyUI class): both ports' names, q/k/v at the model's real widths.

    ``attention.qkv`` holds q (n_heads x head_dim rows, = the input width of
    ``attention.out``) then k and v (n_kv_heads x head_dim rows each): with
    grouped-query attention (Lumina 2: 24 query heads, 8 k/v heads) k and v are
    narrower than q.  Z-Image's port names them ``attention.to_q/k/v``, Lumina 2's
    ``attn.to_q/k/v``; ``to_out.0`` is ``attention.out``.  Z-Image's port keeps
    ComfyUI's other block names.
    """
    sd = model.state_dict()
    out = _port_names(model_keys, "lumina2", identity=True)
    out.update(_port_names(model_keys, "z_image"))
    for path, key in _weight_paths(model_keys).items():
        m = _LUMINA_BLOCK.fullmatch(path)
        out_key = f"{_PREFIX}{m[1]}.{m[2]}.attention.out.weight" if m else None
        if out_key not in sd:
            continue
        block = f"{m[1]}.{m[2]}."
        q = sd[out_key].shape[1]
        kv = (sd[key].shape[0] - q) // 2
        for port in ("attention.", "attn."):
            out.update(_split_rows(key, [f"{block}{port}to_{c}" for c in "qkv"], (q, kv, kv)))
            out[f"{block}{port}to_out.0"] = out_key
    return out


def _comfy_table(function_name: str):
    return lambda model, model_keys: _from_comfy_table(function_name, model, model_keys)


def _ports(family: str, identity: bool = False):
    """A family whose port renames modules one for one (klora_core.name_aliases.PORT_NAMES)."""
    return lambda model, model_keys: _port_names(model_keys, family, identity)


#: ``(ComfyUI model class name, names function)``; classes a version lacks are skipped.
_FAMILY_NAMES = (
    ("Flux", _comfy_table("flux_to_diffusers")),  # FLUX.1, Chroma, FLUX.2
    ("HunyuanVideo", _hunyuan_video),
    ("WAN21", _ports("wan")),  # Wan 2.1 and 2.2
    ("LTXV", _ports("ltxv", identity=True)),
    ("CosmosPredict2", _ports("cosmos_predict2")),
    ("Lumina2", _lumina),  # Lumina 2 and Z-Image
    ("SD3", _comfy_table("mmdit_to_diffusers")),
    ("PixArt", _comfy_table("pixart_to_diffusers")),
    ("AuraFlow", _comfy_table("auraflow_to_diffusers")),
    ("HiDream", _identity),
    ("QwenImage", _identity),
    ("Kandinsky5", _identity),
)


def _unet(model, model_keys) -> dict:
    """SD-style UNets: ``comfy.utils.unet_to_diffusers``, keeping ``to_out.0``, without ``.processor.``."""
    unet_config = getattr(model.model_config, "unet_config", {}) or {}
    out = {}
    for name, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        target = _PREFIX + ldm
        if name.endswith(".weight") and target in model_keys:
            out[name[: -len(".weight")]] = target
    return out


def diffusers_module_names(model, model_keys: set) -> list:
    """``[(prefixes, {diffusers module path: key-map value})]`` for ``model`` (a ComfyUI BaseModel).

    ``model_keys``: the model's state-dict keys.  SD-style UNets come with
    :data:`UNET_PREFIXES`, every recognised DiT family with :data:`DIT_PREFIXES`;
    unknown classes give no names.
    """
    groups = [(UNET_PREFIXES, _unet(model, model_keys))]
    for class_name, names_of in _FAMILY_NAMES:
        cls = getattr(comfy.model_base, class_name, None)
        if cls is not None and isinstance(model, cls):
            groups.append((DIT_PREFIXES, names_of(model, model_keys)))
    return [(prefixes, names) for prefixes, names in groups if names]
