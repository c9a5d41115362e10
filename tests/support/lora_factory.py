"""Seeded LoRA state dicts for a tiny ModelPatcher, in the key styles users meet.

    sd, truth = make_lora(model_patcher, style="peft", rank=4, alpha=None, scope="attn", seed=0)

Styles (``STYLES``; each is a :class:`Style` in ``STYLE_TABLE``: a function
naming every weight it can name, plus the tensor suffixes it writes; add a
naming style by adding an entry), with example names:
- ``"kohya"`` (every family): ComfyUI module path with ``_``:
  ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha`` (what kohya sd-scripts writes for SDXL
  and FLUX: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``;
  ComfyUI maps ``lora_unet_<path>`` for every model).
- ``"comfy_peft"`` (every family): ComfyUI's generic names
  ``diffusion_model.<module path>.lora_A.weight`` / ``.lora_B.weight``
  (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``), the spelling
  ai-toolkit and diffusion-pipe write for most DiTs.
- ``"kohya_diffusers"``: diffusers path with ``_`` after ``lora_unet_``, as sd-scripts
  writes for SD1.5 (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``)
  and musubi-tuner for Z-Image (``lora_unet_layers_0_attention_to_q``).
- ``"diffusers"``: UNet ``unet.<diffusers path>.lora.down.weight`` / ``.lora.up.weight``
  (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight``);
  DiTs ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``
  (FLUX ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, whose delta
  lands in rows [0, 64) of ``double_blocks.0.img_attn.qkv.weight``; Wan
  ``transformer.blocks.0.attn1.to_q``).
- ``"peft"``: UNet ``unet.<diffusers path>.lora_A.weight``; DiTs the bare diffusers
  path (``get_peft_model_state_dict``).
- ``"peft_base"``: ``base_model.model.<diffusers path>.lora_A.weight`` (a saved PeftModel).
- ``"onetrainer"``: ``lora_transformer_<diffusers path with _>`` (OneTrainer).
- ``"diffusion_pipe"`` (HunyuanVideo), ``"zimage_names"`` (Lumina 2, Z-Image),
  ``"kohya_prior"`` (Stable Cascade): see support/trainer_names.py, which also
  holds every DiT family's diffusers table and which styles each family is tested with.
Alpha, when given, is stored as ``<base name>.alpha`` (0-d tensor) in every style.

Scopes: ``"attn"``: the weights the model family's architecture names as
attention projections (``family_models.FamilySpec.attention``, written in the
test support, never taken from the pack): UNet attn1/attn2 to_q, to_k, to_v,
to_out.0; FLUX img_attn/txt_attn qkv and proj (diffusers: to_q/k/v,
add_q/k/v_proj, to_out.0, to_add_out) and single-block linear1/linear2
(diffusers: to_q/k/v, proj_mlp, proj_out); Wan self_attn/cross_attn q/k/v/o
(+ k_img/v_img); and so on per family.  A name that addresses a slice of a
fused weight is in scope when the fused weight is.  ``"all"``: every
Linear/conv weight (ndim >= 2) the style can name. FLUX diffusers
``norm_out.linear`` is left out: ComfyUI applies ``swap_scale_shift`` to its
delta, which the truth tuple cannot express.

``truth`` is built from the naming convention, not from ComfyUI's LoRA parser:
``{model weight key: [(up, down, scale, offset_or_None), ...]}``, e.g.
``"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"``;
``scale`` = alpha / rank (1.0 without alpha); ``offset`` = ``(dim, start, length)``
of the slice of a fused weight the delta lands in. Expected patched weight:
``W0 + strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(slice shape)``.
UNet diffusers names come from ``comfy.utils.unet_to_diffusers`` (name
correspondence only; where two names map to one weight the lexicographically
first, ``add_embedding``, is used); the FLUX table is written out here, the
other families' in support/trainer_names.py (SD3.5, PixArt and AuraFlow, whose
diffusers names ComfyUI maps itself, from ComfyUI's own ``comfy.utils`` tables).

Values: down ~ N(0, 1) * 0.1 * m, up ~ N(0, 1) * 0.1 * m * ``scale``,
with a per-module magnitude m drawn log-uniformly in [0.5, 2] (``magnitudes``), all from one
generator seeded with ``seed`` and modules visited in sorted name order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from support.comfy_env import setup_comfy

SCOPES = ("attn", "all")
#: ComfyUI config classes whose UNet ``comfy.utils.unet_to_diffusers`` names.
_SD_UNETS = ("sd15", "sdxl")


@dataclass(frozen=True)
class Style:
    """A naming style: ``names(model_patcher) -> {lora base name: (model key, offset or None)}``
    for every weight (ndim >= 2) it can name, and the down/up tensor suffixes it writes."""

    names: Callable
    down: str
    up: str
    unet: tuple = None  # (down, up) suffixes for SD1.5/SDXL UNets when they differ

    def suffixes(self, model_patcher) -> tuple:
        return self.unet if self.unet and family_of(model_patcher) == "unet" else (self.down, self.up)


def _family(model_patcher) -> str:
    from support import family_models

    return family_models.family_of_model(model_patcher)


def family_of(model_patcher) -> str:
    """Return ``"flux"`` for FLUX-family models, ``"unet"`` for SD-style UNets, else the family name."""
    name = _family(model_patcher)
    return "unet" if name in _SD_UNETS else name


def _ldm_modules(sd: dict) -> dict:
    """``{ldm path: (model key, None)}`` for every weight with ndim >= 2."""
    out = {}
    for key, tensor in sd.items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and tensor.ndim >= 2:
            out[key[len("diffusion_model."):-len(".weight")]] = (key, None)
    return out


def _unet_diffusers_modules(model, sd: dict) -> dict:
    """``{diffusers path: (model key, None)}`` via comfy.utils.unet_to_diffusers (names only)."""
    import comfy.utils

    out, seen = {}, set()
    for dname, ldm in sorted(comfy.utils.unet_to_diffusers(model.model_config.unet_config).items()):
        key = "diffusion_model." + ldm
        if dname.endswith(".weight") and key in sd and sd[key].ndim >= 2 and key not in seen:
            seen.add(key)  # first (sorted) name wins: add_embedding over class_embedding
            out[dname[: -len(".weight")]] = (key, None)
    return out


def flux_diffusers_modules(model, sd: dict) -> dict:
    """``{diffusers path: (model key, offset or None)}`` for FLUX, written from the diffusers layout."""
    h = model.model_config.unet_config["hidden_size"]
    out = {}

    def add(dpath, ldm, offset=None):
        key = "diffusion_model.{}.weight".format(ldm)
        if key in sd:
            out[dpath] = (key, offset)

    qkv = {"q": (0, 0, h), "k": (0, h, h), "v": (0, 2 * h, h)}
    i = 0
    while "diffusion_model.double_blocks.{}.img_attn.qkv.weight".format(i) in sd:
        d, b = "transformer_blocks.{}.".format(i), "double_blocks.{}.".format(i)
        for c in "qkv":
            add(d + "attn.to_" + c, b + "img_attn.qkv", qkv[c])
            add(d + "attn.add_{}_proj".format(c), b + "txt_attn.qkv", qkv[c])
        for dn, ln in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                       ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                       ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                       ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            add(d + dn, b + ln)
        i += 1
    i = 0
    while "diffusion_model.single_blocks.{}.linear1.weight".format(i) in sd:
        d, b = "single_transformer_blocks.{}.".format(i), "single_blocks.{}.".format(i)
        mlp = sd["diffusion_model.{}linear1.weight".format(b)].shape[0] - 3 * h
        for c in "qkv":
            add(d + "attn.to_" + c, b + "linear1", qkv[c])
        add(d + "proj_mlp", b + "linear1", (0, 3 * h, mlp))
        add(d + "proj_out", b + "linear2")
        add(d + "norm.linear", b + "modulation.lin")
        i += 1
    for dn, ln in (("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
                   ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                   ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                   ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                   ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                   ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                   ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")):
        add(dn, ln)
    return out


def _diffusers_paths(model_patcher) -> dict:
    """``{diffusers path: (model key, offset)}`` of the family's diffusers port (support/trainer_names.py)."""
    from support import trainer_names

    model = model_patcher.model
    sd = model.state_dict()
    fam = family_of(model_patcher)
    if fam == "unet":
        return _unet_diffusers_modules(model, sd)
    if fam in ("flux", "chroma"):
        return flux_diffusers_modules(model, sd)
    paths = trainer_names.dit_paths(model_patcher)
    if paths is None:
        raise ValueError(f"no diffusers names for the {fam} family in lora_factory yet")
    return paths


def _only(families: tuple, paths_of: Callable, style: str) -> Callable:
    """``paths_of`` for models of ``families`` only (a style one trainer writes for those families)."""

    def paths(model_patcher) -> dict:
        if family_of(model_patcher) not in families:
            raise ValueError(f"style {style!r} is a naming of {', '.join(families)} only")
        return paths_of(model_patcher)

    return paths


def _ldm_paths(model_patcher) -> dict:
    return _ldm_modules(model_patcher.model.state_dict())


def _trainer_table(name: str) -> Callable:
    def paths(model_patcher) -> dict:
        from support import trainer_names

        return getattr(trainer_names, name)(model_patcher)

    return paths


def _prefixed(paths_of: Callable, prefixes: dict, underscores: bool = False) -> Callable:
    """Names ``prefix + path`` (``.`` written as ``_`` when ``underscores``); prefix by family kind."""

    def names(model_patcher) -> dict:
        kind = family_of(model_patcher)
        prefix = prefixes.get(kind, prefixes.get("*"))
        if prefix is None:
            raise ValueError(f"no prefix for the {kind} family")
        paths = paths_of(model_patcher)
        return {prefix + (p.replace(".", "_") if underscores else p): t for p, t in paths.items()}

    return names


_KOHYA = (".lora_down.weight", ".lora_up.weight")
_PEFT = (".lora_A.weight", ".lora_B.weight")
STYLE_TABLE = {
    "kohya": Style(_prefixed(_ldm_paths, {"*": "lora_unet_"}, underscores=True), *_KOHYA),
    "comfy_peft": Style(_prefixed(_ldm_paths, {"*": "diffusion_model."}), *_PEFT),
    "kohya_diffusers": Style(_prefixed(_diffusers_paths, {"*": "lora_unet_"}, underscores=True), *_KOHYA),
    "diffusers": Style(_prefixed(_diffusers_paths, {"unet": "unet.", "*": "transformer."}), *_PEFT,
                       unet=(".lora.down.weight", ".lora.up.weight")),
    "peft": Style(_prefixed(_diffusers_paths, {"unet": "unet.", "*": ""}), *_PEFT),
    "peft_base": Style(_prefixed(_diffusers_paths, {"*": "base_model.model."}), *_PEFT),
    "onetrainer": Style(_prefixed(_diffusers_paths, {"*": "lora_transformer_"}, underscores=True), *_KOHYA),
    "diffusion_pipe": Style(_prefixed(_only(("hunyuan_video",), _trainer_table("diffusion_pipe_hunyuan_paths"),
                                            "diffusion_pipe"), {"*": "transformer."}), *_PEFT),
    "zimage_names": Style(_prefixed(_only(("z_image", "lumina2"), _trainer_table("zimage_port_paths"),
                                          "zimage_names"), {"*": "diffusion_model."}), *_PEFT),
    "kohya_prior": Style(_prefixed(_only(("stable_cascade",), _ldm_paths, "kohya_prior"),
                                   {"*": "lora_prior_unet_"}, underscores=True), *_KOHYA),
}
STYLES = tuple(STYLE_TABLE)


def _in_attention_scope(model_patcher) -> Callable:
    """``key -> bool`` from the family's architecture regex (family_models), on the target model key."""
    from support import family_models

    pattern = re.compile(family_models.spec_of(_family(model_patcher)).attention)
    return lambda key: bool(pattern.fullmatch(key[len("diffusion_model."):-len(".weight")]))


def lora_modules(model_patcher, style: str, scope: str, keys=None) -> dict:
    """``{lora base name: (model weight key, offset or None)}`` that make_lora generates.

    ``keys``: when given, only modules whose model weight key is in it.
    """
    if style not in STYLE_TABLE:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    setup_comfy()
    names = STYLE_TABLE[style].names(model_patcher)
    if scope == "attn":
        in_scope = _in_attention_scope(model_patcher)
        names = {n: t for n, t in names.items() if in_scope(t[0])}
    if keys is not None:
        names = {n: t for n, t in names.items() if t[0] in keys}
    return names


def make_lora(model_patcher, style: str = "kohya", rank: int = 4, alpha: float | None = None,
              scope: str = "attn", seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0,
              magnitudes: tuple = (0.5, 2.0), keys=None):
    """Generate a LoRA for ``model_patcher``; returns ``(state_dict, truth)`` (see module docstring).

    ``rank``: r of every module (down [r, in(, kh, kw)], up [out, r(, 1, 1)]).
    ``alpha``: stored as ``.alpha`` when not None; truth scale = alpha / rank, else 1.0.
    ``scale``: multiplies every up tensor (a global rescale of the LoRA).
    ``magnitudes``: range of the per-module magnitude m (``(1.0, 1.0)``: every module alike,
    same random stream).  ``keys``: only modules targeting these model weight keys.
    """
    modules = lora_modules(model_patcher, style, scope, keys)
    sd_model = model_patcher.model.state_dict()
    down_sfx, up_sfx = STYLE_TABLE[style].suffixes(model_patcher)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state_dict, truth = {}, {}
    lo, hi = torch.log(torch.tensor(float(magnitudes[0]))), torch.log(torch.tensor(float(magnitudes[1])))
    for base in sorted(modules):  # sorted: independent of dict/key-map order
        key, offset = modules[base]
        w = sd_model[key]
        out_dim = offset[2] if offset is not None else w.shape[0]
        mag = float(torch.exp(lo + (hi - lo) * torch.rand((), generator=gen)))
        kernel = tuple(w.shape[2:])
        down = torch.randn((rank, w.shape[1]) + kernel, generator=gen) * (0.1 * mag)
        up = torch.randn((out_dim, rank) + (1,) * len(kernel), generator=gen) * (0.1 * mag * scale)
        down, up = down.to(dtype), up.to(dtype)
        state_dict[base + down_sfx] = down
        state_dict[base + up_sfx] = up
        if alpha is not None:
            state_dict[base + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
        s = float(alpha) / rank if alpha is not None else 1.0
        truth.setdefault(key, []).append((up.clone(), down.clone(), s, offset))
    return state_dict, truth


def expected_weight(w0: torch.Tensor, entries, strength: float = 1.0) -> torch.Tensor:
    """Brute force ``W0 + strength * scale * up @ down`` (per slice) in float64, from truth entries."""
    w = w0.detach().to(torch.float64).clone()
    for up, down, s, offset in entries:
        view = w if offset is None else w.narrow(offset[0], offset[1], offset[2])
        delta = up.to(torch.float64).flatten(1) @ down.to(torch.float64).flatten(1)
        view += strength * s * delta.reshape(view.shape)
    return w


def save_lora(state_dict: dict, path) -> None:
    """Write ``state_dict`` to ``path`` as safetensors (contiguous, unshared copies)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path))


def check_patched_weights(model_patcher, patches: dict, truth: dict, strength: float) -> None:
    """Patch ``model_patcher`` with ``patches`` at ``strength``; every truth weight must equal the brute force
    :func:`expected_weight` (rtol 1e-5) and differ from its original, every other weight stay bit-identical;
    afterwards every weight is restored.  ``len(truth modules)`` patches must be accepted.  Raises AssertionError."""
    w0 = {k: v.detach().clone() for k, v in model_patcher.model.state_dict().items()}
    n_modules = sum(len(entries) for entries in truth.values())
    assert len(model_patcher.add_patches(patches, strength)) == n_modules
    model_patcher.patch_model(device_to=torch.device("cpu"))
    try:
        now = model_patcher.model.state_dict()
        for key, w in w0.items():
            if key in truth:
                want = expected_weight(w, truth[key], strength)
                torch.testing.assert_close(now[key].to(torch.float64), want, rtol=1e-5, atol=1e-6, msg=key)
                assert not torch.equal(now[key], w), key
            else:
                assert torch.equal(now[key], w), f"{key} changed but no LoRA module targets it"
    finally:
        model_patcher.unpatch_model(device_to=torch.device("cpu"))
    for key, w in w0.items():
        assert torch.equal(model_patcher.model.state_dict()[key], w), f"{key} not restored"
