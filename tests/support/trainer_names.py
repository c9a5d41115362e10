"""What the trainers people use write, per model family: diffusers-layout names and the style matrix.

Written for the tests from each family's two module trees (ComfyUI's
``comfy/ldm/<family>`` and the diffusers port's), never from the pack:

    paths = diffusers_paths(model_patcher)     # {diffusers module path: (model key, offset or None)}
    TRAINER_STYLES["wan21_t2v"]                 # the naming styles tested for that family

Offsets are ``(0, start, rows)`` of a fused weight (q/k/v inside ``qkv``), their
widths from the family's config (``family_models.FamilySpec.unet_config``):
Lumina 2's grouped-query k/v are ``n_kv_heads * head_dim`` rows, q ``dim``.

Which trainer writes what (the styles of tests/support/lora_factory.py):

- ``kohya``: ``lora_unet_<ComfyUI path, . as _>``: kohya sd-scripts (SDXL, SD3, FLUX,
  Lumina), musubi-tuner (Wan, HunyuanVideo, Qwen-Image, FramePack), OneTrainer's
  kohya export.
- ``comfy_peft``: ``diffusion_model.<ComfyUI path>.lora_A/B``: diffusion-pipe and
  ai-toolkit for most DiTs, LTX-Video-Trainer.
- ``diffusers``: ``transformer.<diffusers path>.lora_A/B`` (UNets ``unet.``):
  diffusers' training scripts, SimpleTuner, finetrainers, ai-toolkit (FLUX).
- ``peft``: the same without prefix (``get_peft_model_state_dict``; DiffSynth).
- ``peft_base``: ``base_model.model.<diffusers path>`` (a saved PeftModel).
- ``kohya_diffusers``: ``lora_unet_<diffusers path, . as _>``: sd-scripts for SD1.5,
  musubi-tuner for Z-Image (its modules are Z-Image's diffusers ones).
- ``onetrainer``: ``lora_transformer_<diffusers path, . as _>``: OneTrainer.
- ``diffusion_pipe``: HunyuanVideo only: ``transformer.double_blocks.0.img_attn_qkv``,
  ``img_mod.linear``, ``img_mlp.fc1`` (the original HunyuanVideo module names).
- ``zimage_names``: ``diffusion_model.<Z-Image diffusers path>``: ai-toolkit's Z-Image
  files; on Lumina 2 the same spelling with grouped-query k/v.
- ``kohya_prior``: ``lora_prior_unet_<path>``: Stable Cascade stage C (kohya, OneTrainer).
"""
from __future__ import annotations

import re
from typing import Callable

from support import family_models

#: Naming styles tested per family (tests/test_trainer_names.py).  Natively detected
#: duplicates of a family (``*_native``) use the same names as their reduced twin.
TRAINER_STYLES = {
    "sd15": ("kohya", "kohya_diffusers", "diffusers", "peft", "peft_base", "comfy_peft"),
    "sdxl": ("kohya", "kohya_diffusers", "diffusers", "peft", "peft_base", "comfy_peft"),
    "sd35": ("kohya", "comfy_peft", "diffusers", "peft", "onetrainer"),
    "flux": ("kohya", "comfy_peft", "diffusers", "peft", "peft_base", "onetrainer"),
    "chroma": ("kohya", "comfy_peft", "diffusers"),
    "hidream": ("kohya", "comfy_peft", "diffusers"),
    "qwen_image": ("kohya", "comfy_peft", "diffusers", "peft"),
    "lumina2": ("kohya", "comfy_peft", "diffusers", "zimage_names"),
    "z_image": ("kohya", "kohya_diffusers", "comfy_peft", "zimage_names", "diffusers"),
    "wan21_t2v": ("kohya", "comfy_peft", "diffusers", "peft"),
    "wan21_i2v": ("kohya", "comfy_peft", "diffusers", "peft"),
    "wan22": ("kohya", "comfy_peft", "diffusers", "peft"),
    "hunyuan_video": ("kohya", "comfy_peft", "diffusion_pipe", "diffusers"),
    "ltxv": ("kohya", "comfy_peft", "diffusers"),
    "cosmos_predict2": ("kohya", "comfy_peft", "diffusers", "peft"),
    "pixart": ("kohya", "comfy_peft", "diffusers"),
    "auraflow": ("kohya", "comfy_peft", "diffusers"),
    "stable_cascade": ("kohya", "comfy_peft", "kohya_prior"),
    "kandinsky5": ("kohya", "comfy_peft", "diffusers"),
}

_DM = "diffusion_model."


def _sd(model_patcher) -> dict:
    return model_patcher.model.state_dict()


def _table(sd: dict, pairs) -> dict:
    """``{diffusers path: (model key, offset)}`` of ``(diffusers path, ComfyUI path, offset)`` whose weight exists."""
    out = {}
    for theirs, ours, offset in pairs:
        key = f"{_DM}{ours}.weight"
        if key in sd:
            out[theirs] = (key, offset)
    return out


def _indices(sd: dict, pattern: str) -> list:
    """Sorted block indices N of keys ``diffusion_model.<pattern with N>...``."""
    found = {int(m[1]) for k in sd for m in [re.match(_DM + pattern, k)] if m}
    return sorted(found)


def _thirds(prefix_theirs: str, names, ours: str, rows: int) -> list:
    return [(prefix_theirs + name, ours, (0, i * rows, rows)) for i, name in enumerate(names)]


def wan_paths(model_patcher) -> dict:
    """Wan 2.x: diffusers' WanTransformer3DModel names."""
    sd = _sd(model_patcher)
    pairs = []
    for i in _indices(sd, r"blocks\.(\d+)\."):
        b = f"blocks.{i}."
        for attn, ours in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            pairs += [(f"{b}{attn}.to_q", f"{b}{ours}.q", None), (f"{b}{attn}.to_k", f"{b}{ours}.k", None),
                      (f"{b}{attn}.to_v", f"{b}{ours}.v", None), (f"{b}{attn}.to_out.0", f"{b}{ours}.o", None)]
        pairs += [(f"{b}attn2.add_k_proj", f"{b}cross_attn.k_img", None),
                  (f"{b}attn2.add_v_proj", f"{b}cross_attn.v_img", None),
                  (f"{b}ffn.net.0.proj", f"{b}ffn.0", None), (f"{b}ffn.net.2", f"{b}ffn.2", None)]
    pairs += [("patch_embedding", "patch_embedding", None), ("proj_out", "head.head", None),
              ("condition_embedder.text_embedder.linear_1", "text_embedding.0", None),
              ("condition_embedder.text_embedder.linear_2", "text_embedding.2", None),
              ("condition_embedder.time_embedder.linear_1", "time_embedding.0", None),
              ("condition_embedder.time_embedder.linear_2", "time_embedding.2", None),
              ("condition_embedder.time_proj", "time_projection.1", None),
              ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1", None),
              ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3", None)]
    return _table(sd, pairs)


def hunyuan_video_paths(model_patcher) -> dict:
    """HunyuanVideo: FLUX's diffusers names for the double/single blocks, plus embedders and token refiner."""
    from support.lora_factory import flux_diffusers_modules

    sd = _sd(model_patcher)
    out = {k: v for k, v in flux_diffusers_modules(model_patcher.model, sd).items() if k != "x_embedder"}
    h = model_patcher.model.model_config.unet_config["hidden_size"]
    refiner, theirs = "txt_in.individual_token_refiner.blocks.{}.", "context_embedder.token_refiner.refiner_blocks.{}."
    pairs = [("x_embedder.proj", "img_in.proj", None), ("context_embedder.proj_in", "txt_in.input_embedder", None),
             ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.in_layer", None),
             ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.out_layer", None),
             ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer", None),
             ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.out_layer", None)]
    for i in _indices(sd, r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."):
        r, t = refiner.format(i), theirs.format(i)
        pairs += _thirds(t + "attn.", ("to_q", "to_k", "to_v"), r + "self_attn.qkv", h)
        pairs += [(t + "attn.to_out.0", r + "self_attn.proj", None), (t + "ff.net.0.proj", r + "mlp.0", None),
                  (t + "ff.net.2", r + "mlp.2", None), (t + "norm_out.linear", r + "adaLN_modulation.1", None)]
    out.update(_table(sd, pairs))
    return out


def diffusion_pipe_hunyuan_paths(model_patcher) -> dict:
    """diffusion-pipe's HunyuanVideo LoRAs: the original module names of the double/single blocks it trains."""
    renames = (("_mod.lin", "_mod.linear"), ("modulation.lin", "modulation.linear"), ("_attn.qkv", "_attn_qkv"),
               ("_attn.proj", "_attn_proj"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2"))
    out = {}
    for key, tensor in _sd(model_patcher).items():
        if not re.match(_DM + r"(double_blocks|single_blocks)\.", key) or not key.endswith(".weight"):
            continue
        if tensor.ndim < 2:
            continue
        path = key[len(_DM):-len(".weight")]
        for ours, theirs in renames:
            if path.endswith(ours) or f"{ours}." in path:
                path = path.replace(ours, theirs)
        out[path] = (key, None)
    return out


def ltxv_paths(model_patcher) -> dict:
    """LTX-Video: diffusers' LTXVideoTransformer3DModel = ComfyUI's tree with proj_in and time_embed renamed."""
    out = {}
    for key, tensor in _sd(model_patcher).items():
        if key.startswith(_DM) and key.endswith(".weight") and tensor.ndim >= 2:
            path = key[len(_DM):-len(".weight")]
            if path == "patchify_proj":
                path = "proj_in"
            elif path.startswith("adaln_single."):
                path = "time_embed." + path[len("adaln_single."):]
            out[path] = (key, None)
    return out


#: Cosmos Predict2: diffusers' renames of the original (= ComfyUI's) names, applied in this order
#: (diffusers' scripts/convert_cosmos_to_diffusers.py, its Cosmos 2.0 table: substring replacements).
_COSMOS_RENAMES = (
    ("t_embedder.1", "time_embed.t_embedder"), ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"), ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"), ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"), ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"), ("cross_attn", "attn2"), ("q_proj", "to_q"), ("k_proj", "to_k"),
    ("v_proj", "to_v"), ("output_proj", "to_out.0"), ("mlp.layer1", "ff.net.0.proj"), ("mlp.layer2", "ff.net.2"),
    ("x_embedder.proj.1", "patch_embed.proj"), ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"), ("final_layer.linear", "proj_out"),
)


def cosmos_predict2_paths(model_patcher) -> dict:
    """Cosmos Predict2: diffusers' CosmosTransformer3DModel names of every 2-D weight."""
    out = {}
    for key, tensor in _sd(model_patcher).items():
        if key.startswith(_DM) and key.endswith(".weight") and tensor.ndim >= 2:
            path = key[len(_DM):-len(".weight")]
            for old, new in _COSMOS_RENAMES:
                path = path.replace(old, new)
            out[path] = (key, None)
    return out


def _lumina_widths(model_patcher) -> tuple:
    config = model_patcher.model.model_config.unet_config
    head = config["dim"] // config["n_heads"]
    return config["dim"], head * config.get("n_kv_heads", config["n_heads"])


def _lumina_blocks(sd: dict):
    for part in ("noise_refiner", "context_refiner", "layers"):
        for i in _indices(sd, part + r"\.(\d+)\.attention\.qkv"):
            yield f"{part}.{i}."


def _lumina_port(model_patcher, attn: str, block_pairs, global_pairs) -> dict:
    """A Lumina 2 / Z-Image diffusers port: ``<block>.<attn>to_q/k/v`` slices of ``attention.qkv`` (q ``dim``
    rows, k and v ``n_kv_heads * head_dim`` each), ``to_out.0`` = ``attention.out``, then renamed pairs."""
    sd = _sd(model_patcher)
    q, kv = _lumina_widths(model_patcher)
    pairs = []
    for b in _lumina_blocks(sd):
        qkv = b + "attention.qkv"
        pairs += [(b + attn + "to_q", qkv, (0, 0, q)), (b + attn + "to_k", qkv, (0, q, kv)),
                  (b + attn + "to_v", qkv, (0, q + kv, kv)), (b + attn + "to_out.0", b + "attention.out", None)]
        pairs += [(b + theirs, b + ours, None) for theirs, ours in block_pairs]
    pairs += [(theirs, ours, None) for theirs, ours in global_pairs]
    return _table(sd, pairs)


_ZIMAGE_BLOCK = [(n, n) for n in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0",
                                  "adaLN_modulation.1")]
_ZIMAGE_GLOBAL = [("all_x_embedder.2-1", "x_embedder"), ("all_final_layer.2-1.linear", "final_layer.linear"),
                  ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
                  ("cap_embedder.1", "cap_embedder.1"), ("t_embedder.mlp.0", "t_embedder.mlp.0"),
                  ("t_embedder.mlp.2", "t_embedder.mlp.2")]
_LUMINA2_BLOCK = [(f"feed_forward.linear_{n}", f"feed_forward.w{n}") for n in (1, 2, 3)] + [
    ("norm1.linear", "adaLN_modulation.1")]
_LUMINA2_GLOBAL = [("x_embedder", "x_embedder"),
                   ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                   ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                   ("time_caption_embed.caption_embedder.1", "cap_embedder.1"),
                   ("norm_out.linear_1", "final_layer.adaLN_modulation.1"), ("norm_out.linear_2", "final_layer.linear")]


def zimage_port_paths(model_patcher) -> dict:
    """Z-Image's diffusers port (ZImageTransformer2DModel): ``attention.to_q/k/v``, ``to_out.0``, ``all_*``."""
    return _lumina_port(model_patcher, "attention.", _ZIMAGE_BLOCK, _ZIMAGE_GLOBAL)


def lumina2_port_paths(model_patcher) -> dict:
    """Lumina 2's diffusers port (Lumina2Transformer2DModel): ``attn.to_q/k/v``, ``feed_forward.linear_N``."""
    return _lumina_port(model_patcher, "attn.", _LUMINA2_BLOCK, _LUMINA2_GLOBAL)


def _comfy_utils_table(function_name: str) -> Callable:
    """Families ComfyUI itself maps diffusers names for: its own ``comfy.utils`` table (names only)."""

    def paths(model_patcher) -> dict:
        import comfy.utils

        table = getattr(comfy.utils, function_name)(model_patcher.model.model_config.unet_config, output_prefix=_DM)
        sd = _sd(model_patcher)
        out = {}
        for name, target in table.items():
            if not isinstance(target, str) and len(target) > 2 and target[2] is not None:
                continue  # a delta ComfyUI transforms (swap_scale_shift): the truth tuple cannot say so
            key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
            if name.endswith(".weight") and key in sd and sd[key].ndim >= 2:
                out[name[: -len(".weight")]] = (key, None if offset is None else tuple(offset))
        return out

    return paths


def identity_paths(model_patcher) -> dict:
    """Families whose diffusers module tree is ComfyUI's (HiDream, Qwen-Image, Kandinsky 5)."""
    return {k[len(_DM):-len(".weight")]: (k, None) for k, t in _sd(model_patcher).items()
            if k.startswith(_DM) and k.endswith(".weight") and t.ndim >= 2}


_DIT_PATHS = {
    "wan21_t2v": wan_paths, "wan21_i2v": wan_paths, "wan22": wan_paths, "wan21_t2v_native": wan_paths,
    "hunyuan_video": hunyuan_video_paths, "hunyuan_video_native": hunyuan_video_paths,
    "ltxv": ltxv_paths, "cosmos_predict2": cosmos_predict2_paths,
    "lumina2": lumina2_port_paths, "z_image": zimage_port_paths,
    "sd35": _comfy_utils_table("mmdit_to_diffusers"), "pixart": _comfy_utils_table("pixart_to_diffusers"),
    "auraflow": _comfy_utils_table("auraflow_to_diffusers"),
    "hidream": identity_paths, "qwen_image": identity_paths, "kandinsky5": identity_paths,
}


def dit_paths(model_patcher):
    """The diffusers table of a DiT family other than FLUX/Chroma, or None when there is none here."""
    paths_of = _DIT_PATHS.get(family_models.family_of_model(model_patcher))
    return None if paths_of is None else paths_of(model_patcher)
