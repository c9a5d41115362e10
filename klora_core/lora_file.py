"""LoRA key names without ComfyUI: group a file's tensors into ``(up, down)`` per module.

Used by the command line and the ``/klora/preview`` route.  The file itself is
read by :func:`klora_core.safe_load.load_tensors` (safe loaders only).

:func:`load_lora_file` returns ``{module_name: (up, down)}`` where
``up @ down`` is the scaled delta of that module's weight:

- ``up``: float32 ``[out, rank]`` (conv: ``[out, rank, 1, 1]``), already
  multiplied by ``alpha / rank`` (1 when the file stores no alpha, e.g. PEFT
  files, i.e. alpha = rank) and by ``strength``;
- ``down``: float32 ``[rank, in]`` (conv: ``[rank, in, kh, kw]``).

Recognised naming conventions (``X`` is the module name):

- kohya / sd-scripts: ``X.lora_down.weight``, ``X.lora_up.weight``, ``X.alpha``
- diffusers: ``X.lora.down.weight``, ``X.lora.up.weight`` and the older
  attention-processor form ``X_lora.down.weight`` / ``X_lora.up.weight``
- PEFT: ``X.lora_A.weight`` (down), ``X.lora_B.weight`` (up), optional ``X.alpha``

Module names are normalised by :func:`canonical_module_name` so that the same
layer named by a kohya file and by a diffusers/PEFT file of the same model pair
up.  Limits of that normalisation are listed in its docstring.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterable, Mapping, Union

from .errors import KLoRAError
from .name_aliases import comfy_spelling
from .safe_load import load_tensors

log = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers", "peft", "unknown")
FAMILIES = ("sd15", "sdxl", "flux", "unknown")

# (regex on the full tensor key, format, role); role is "down", "up" or "alpha".
_KEY_PATTERNS = (
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "kohya", "down"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "kohya", "up"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "diffusers", "down"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "diffusers", "up"),
    (re.compile(r"^(?P<m>.+)_lora\.down\.weight$"), "diffusers", "down"),
    (re.compile(r"^(?P<m>.+)_lora\.up\.weight$"), "diffusers", "up"),
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "peft", "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "peft", "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), None, "alpha"),
)
# Keys of adapters this reader does not turn into (up, down) pairs.
_UNSUPPORTED = re.compile(r"(hada_|lokr_|oft_|\.lora_mid\.|\.diff(_b)?$|\.dora_scale$|lora_magnitude_vector)")

# Leading name parts that only say which model or wrapper a module belongs to.
# Order matters: longer, more specific prefixes first.  Text-encoder prefixes
# become te1_ / te2_ so they never collide with UNet/transformer modules.
_PREFIXES = (
    ("base_model.model.", ""),
    ("model.diffusion_model.", ""),
    ("diffusion_model.", ""),
    ("lora_unet_", ""),
    ("lora_prior_unet_", ""),
    ("lora_transformer_", ""),
    ("unet.", ""),
    ("transformer.", ""),
    ("lora_te1_", "te1_"),
    ("lora_te2_", "te2_"),
    ("lora_te_", "te1_"),
    ("text_encoder_2.", "te2_"),
    ("text_encoder.", "te1_"),
)
_LDM_INNER = r"(?P<rest>(?:transformer_blocks|proj_in|proj_out|norm)(?:_.*)?)"
_LDM_INPUT = re.compile(r"^input_blocks_(?P<n>\d+)_1_" + _LDM_INNER + "$")
_LDM_MIDDLE = re.compile(r"^middle_block_1_" + _LDM_INNER + "$")
_LDM_OUTPUT = re.compile(r"^output_blocks_(?P<n>\d+)_1_" + _LDM_INNER + "$")

PathLike = Union[str, os.PathLike]


def canonical_module_name(name: str) -> str:
    """One spelling for a module name, whatever file convention wrote it.

    Steps: strip wrapper prefixes (``base_model.model.``, ``lora_unet_``,
    ``unet.``, ``transformer.``, ``diffusion_model.``, ...; text-encoder
    prefixes become ``te1_``/``te2_``), drop the old diffusers ``processor.``
    level (``to_out`` there becomes ``to_out_0``), write every ``.`` as ``_``,
    and rename the attention blocks of an LDM-named UNet (``input_blocks_4_1_``,
    ``middle_block_1_``, ``output_blocks_0_1_`` as kohya's SDXL trainer writes)
    to their diffusers names (``down_blocks_1_attentions_0_`` ...).  Diffusers-port
    names of DiT families that differ from ComfyUI's only by name (Wan's
    ``blocks_0_attn1_to_q`` = ``blocks_0_self_attn_q``, ...) take ComfyUI's spelling
    (:mod:`klora_core.name_aliases`).

    Limits: the LDM renaming assumes two res blocks per UNet level (SD1.x,
    SD2.x, SDXL) and covers only attention blocks (res blocks, up/down
    samplers and conv_in/out keep LDM names, so they pair only with files
    that use the same names).  Files in ComfyUI's layout with fused weights
    (FLUX/Chroma/HunyuanVideo ``double_blocks``, SD3.5, PixArt, Lumina 2 and
    Z-Image ``qkv``) cannot pair with diffusers-port files that split them
    (separate ``to_q``/``to_k``/``to_v``).  Text-encoder naming is normalised by prefix only.
    """
    out = name
    changed = True
    while changed:
        changed = False
        for prefix, replacement in _PREFIXES:
            if out.startswith(prefix):
                out = replacement + out[len(prefix):]
                changed = replacement == ""
                break
    if ".processor." in out:
        out = out.replace(".processor.", ".")
        if out.endswith(".to_out"):
            out += ".0"
    out = out.replace(".", "_")
    if not out.startswith(("te1_", "te2_")):
        out = comfy_spelling(out)
    m = _LDM_INPUT.match(out)
    if m:
        n = int(m["n"]) - 1
        if n >= 0 and n % 3 < 2:
            return f"down_blocks_{n // 3}_attentions_{n % 3}_{m['rest']}"
    m = _LDM_MIDDLE.match(out)
    if m:
        return f"mid_block_attentions_0_{m['rest']}"
    m = _LDM_OUTPUT.match(out)
    if m:
        n = int(m["n"])
        return f"up_blocks_{n // 3}_attentions_{n % 3}_{m['rest']}"
    return out


def _classify(key: str):
    for pattern, fmt, role in _KEY_PATTERNS:
        m = pattern.match(key)
        if m:
            return m["m"], fmt, role
    return None


def detect_format(state_dict: Union[Mapping, Iterable[str]]) -> str:
    """``"kohya"``, ``"diffusers"``, ``"peft"`` or ``"unknown"`` from the tensor key names.

    Mixed files report the convention most of their LoRA keys use.
    """
    counts = {"kohya": 0, "diffusers": 0, "peft": 0}
    for key in state_dict:
        found = _classify(str(key))
        if found and found[1]:
            counts[found[1]] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] else "unknown"


_PROJ_ORDER = ((re.compile(r"(?<![a-z])(to_)?q(_proj)?$"), "~0"), (re.compile(r"(?<![a-z])(to_)?k(_proj)?$"), "~1"),
               (re.compile(r"(?<![a-z])(to_)?v(_proj)?$"), "~2"), (re.compile(r"(?<![a-z])(to_)?out(_0|_proj)?$"), "~3"))


def _natural_key(name: str):
    """Sort key: diffusion model before text encoders, numbers numerically, then q, k, v, out."""
    te = name.startswith(("te1_", "te2_"))
    for pattern, rank in _PROJ_ORDER:
        name = pattern.sub(rank, name)
    if name.startswith("single_transformer_blocks"):  # diffusers FLUX: single-stream blocks come after
        name = "~" + name
    return (te, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def _module_names_and_shapes(keys: Union[Mapping, Iterable[str]]):
    shapes = {}
    names = set()
    for key in keys:
        found = _classify(str(key))
        module = canonical_module_name(found[0] if found else str(key).rsplit(".", 1)[0])
        names.add(module)
        if found and found[2] == "down" and isinstance(keys, Mapping):
            shape = getattr(keys[key], "shape", None)
            if shape is not None and len(shape) >= 2:
                shapes[module] = tuple(int(s) for s in shape)
    return names, shapes


def detect_family(keys: Union[Mapping, Iterable[str]]) -> str:
    """Best-effort base-model family: ``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"unknown"``.

    ``keys`` is an iterable of tensor key names, or a state dict (then tensor
    shapes are used too: the input width of a cross-attention ``to_k`` is the
    text-context width, 768 for SD1.x and 2048 for SDXL).  Names alone decide
    when they are conclusive: FLUX block names; a second text encoder or
    transformer depth > 1 means SDXL; attention at the first UNet level
    (``down_blocks_0_attentions``) means SD1.x/2.x layout.  An SD2.x file
    (context 1024) is reported as ``"unknown"`` when shapes are given.
    """
    names, shapes = _module_names_and_shapes(keys)
    joined = "\n".join(sorted(names))
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn|add_q_proj|"
                 r"context_embedder|x_embedder|img_mlp|txt_mlp", joined):
        return "flux"
    context = {s[1] for n, s in shapes.items() if re.search(r"attn2_to_k$", n)}
    if 2048 in context:
        return "sdxl"
    if re.search(r"(?m)^te2_|add_embedding|label_emb|(?:down|up|mid)_blocks?_\d*_?attentions_\d+_transformer_blocks_[1-9]", joined):
        return "sdxl"
    if context and context != {768}:
        return "unknown"
    if 768 in context or re.search(r"(?m)^down_blocks_0_attentions_", joined):
        return "sd15"
    return "unknown"


def lora_modules(state_dict: Mapping, strength: float = 1.0, *, source: str = "state dict") -> dict:
    """Group a LoRA state dict into ``{canonical_module_name: (up, down)}``.

    ``up`` is float32 and scaled by ``alpha / rank * strength`` (alpha absent:
    scale ``strength``); ``down`` is float32.  Modules come in natural model
    order (diffusion model first, then text encoders).  Adapters other than
    plain LoRA/LoCon (LoHa, LoKr, OFT, Tucker ``lora_mid``) are skipped with a
    warning; DoRA magnitudes are ignored with a warning.  Raises KLoRAError
    (naming ``source``) for half modules, rank mismatches, name collisions,
    or when no LoRA module is found.
    """
    import torch

    parts: dict = {}
    unsupported = []
    for key, tensor in state_dict.items():
        if _UNSUPPORTED.search(key):
            unsupported.append(key)
            continue
        found = _classify(key)
        if found is None:
            log.debug("%s: ignoring tensor %s (not a LoRA key)", source, key)
            continue
        module, _fmt, role = found
        parts.setdefault(module, {})[role] = tensor
    if unsupported:
        log.warning("%s: %d tensors of unsupported adapter types (LoHa/LoKr/OFT/Tucker/DoRA) ignored, e.g. %s",
                    source, len(unsupported), unsupported[0])

    out = {}
    origin = {}
    for module, p in parts.items():
        if "up" not in p and "down" not in p:
            continue  # an alpha without weights (e.g. of a skipped LoHa module)
        if "up" not in p or "down" not in p:
            have, missing = ("down", "up") if "down" in p else ("up", "down")
            raise KLoRAError(f"{source}: module {module!r} has a {have} weight but no {missing} weight; the file is incomplete")
        up = p["up"].to(torch.float32)
        down = p["down"].to(torch.float32)
        if up.dim() < 2 or down.dim() < 2:
            raise KLoRAError(f"{source}: module {module!r} has up {tuple(up.shape)} and down {tuple(down.shape)}; not a LoRA")
        rank = int(down.shape[0])
        if int(up.flatten(1).shape[1]) != rank:
            raise KLoRAError(
                f"{source}: module {module!r}: up {tuple(up.shape)} and down {tuple(down.shape)} have different ranks; "
                "the file is corrupt"
            )
        scale = float(strength)
        if "alpha" in p:
            alpha = float(p["alpha"].reshape(-1)[0])
            scale *= alpha / rank
        name = canonical_module_name(module)
        if name in out:
            raise KLoRAError(f"{source}: modules {origin[name]!r} and {module!r} both normalise to {name!r}")
        origin[name] = module
        out[name] = ((up * scale).contiguous(), down.contiguous())
    if not out:
        raise KLoRAError(
            f"{source}: no LoRA weights found (expected kohya lora_down/lora_up, diffusers lora.down/lora.up "
            "or PEFT lora_A/lora_B keys)"
        )
    return {k: out[k] for k in sorted(out, key=_natural_key)}


def load_lora_file(path: PathLike, strength: float = 1.0, label: str = "LoRA") -> dict:
    """``{canonical_module_name: (up, down)}`` of a LoRA file (see module docstring)."""
    sd = load_tensors(path, label)
    modules = lora_modules(sd, strength, source=os.fspath(path))
    log.info("%s: %d LoRA modules, format %s, family %s", os.fspath(path), len(modules), detect_format(sd), detect_family(sd))
    return modules
