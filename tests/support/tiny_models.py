"""Tiny, seeded, float32 ComfyUI models for tests (CPU).

Each builder returns a ``comfy.model_patcher.ModelPatcher`` (load and offload
device CPU) around a real ComfyUI model class, with every parameter filled
from a seeded ``torch.Generator`` (``normal * 0.05``): ComfyUI allocates
weights uninitialised, so without this, outputs would be garbage or NaN.
Same seed, same weights, bit for bit.

Families (``FAMILIES``):
- ``"sd15"``: ``comfy.supported_models.SD15``; UNet with model_channels 32,
  channel_mult [1, 2], one res block per level, one transformer per
  level/middle/output block, conv proj_in/proj_out (as SD1.5), context 768,
  8 heads. 1.57 M parameters; latents [B, 4, H, W].
- ``"sdxl"``: ``comfy.supported_models.SDXL``; model_channels 32,
  channel_mult [1, 2], transformer_depth [0, 1] (SDXL has no attention at the
  first level), middle 1, output [0, 0, 1, 1], linear proj_in/proj_out,
  context 2048, adm 2816 (= pooled 1280 + 6 x 256 size embeddings, fixed by
  ``model_base.SDXL.encode_adm``), 64-channel heads. 2.39 M parameters; latents [B, 4, H, W].
- ``"flux"``: ``comfy.supported_models.Flux``; hidden 64, 2 heads (head dim
  32 = axes_dim [8, 12, 12]), 2 double + 2 single blocks, mlp_ratio 4,
  context_in_dim 32, vec_in_dim 32, guidance_embed True, patch 2.
  0.49 M parameters; latents [B, 16, H, W] with H, W even.

Conditioning (``make_conds``): ComfyUI CONDITIONING lists
``[[cross_attn [B, T, context_dim], {"pooled_output": [B, P], ...}]]``; T = 77
for the UNets, 8 tokens for FLUX; P = 1280 (SDXL), 32 (FLUX); FLUX also gets
``"guidance": 3.5``.

They are small enough that a sampling run takes a fraction of a second on one
CPU thread (timings: bench/README.md, "The test models").
"""
from __future__ import annotations

import torch

from support.comfy_env import setup_comfy

FAMILIES = ("sd15", "sdxl", "flux")

_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

#: unet_config per family (before the model class adds its extra config).
CONFIGS = {
    "sd15": {
        **_UNET_COMMON,
        "adm_in_channels": None,
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1],
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
    },
    "sdxl": {
        **_UNET_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "transformer_depth": [0, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [0, 0, 1, 1],
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
    },
    "flux": {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 32,
        "context_in_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [8, 12, 12],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": True,
    },
}

#: Latent channels per family.
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16}
#: Text tokens and pooled width used by make_conds.
COND_TOKENS = {"sd15": 77, "sdxl": 77, "flux": 8}
POOLED_DIM = {"sd15": None, "sdxl": 1280, "flux": 32}


def _model_config_class(family: str):
    import comfy.supported_models as sm

    return {"sd15": sm.SD15, "sdxl": sm.SDXL, "flux": sm.Flux}[family]


def fill_seeded_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Overwrite every parameter of ``module`` in place with ``N(0, 1) * std``.

    Parameters are visited in sorted name order so the values depend only on
    the seed and the parameter names/shapes, never on registration order.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            values = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.copy_(values.to(p.dtype))


def installed_config(family: str, **overrides) -> dict:
    """``CONFIGS[family]`` with ``overrides``, plus what the imported ComfyUI's model class requires.

    Feature-detected, not by version: ComfyUI 0.8's ``FluxParams`` has a required
    field ``txt_ids_dims`` (FLUX.1: ``[]``, as its ``model_detection`` sets it),
    which 0.3.75's rejects.
    """
    config = {**CONFIGS[family], **overrides}
    if family == "flux":
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            config.setdefault("txt_ids_dims", [])
    return config


def build_model(family: str, seed: int = 0, std: float = 0.05):
    """Build a tiny float32 model of ``family`` ("sd15", "sdxl", "flux"), wrapped in a CPU ModelPatcher."""
    if family not in CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    setup_comfy()
    import comfy.model_patcher

    model_config = _model_config_class(family)(installed_config(family))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    model.eval()
    fill_seeded_(model.diffusion_model, seed, std)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def build_sd15(seed: int = 0):
    """Tiny SD1.5-shaped UNet (see module docstring)."""
    return build_model("sd15", seed)


def build_sdxl(seed: int = 0):
    """Tiny SDXL-shaped UNet (see module docstring)."""
    return build_model("sdxl", seed)


def build_flux(seed: int = 0):
    """Tiny FLUX-shaped transformer (see module docstring)."""
    return build_model("flux", seed)


def make_conds(family: str, batch: int = 1, seed: int = 0):
    """Positive and negative CONDITIONING for ``family``, seeded.

    Returns ``(positive, negative)``, each ``[[cross_attn, extras]]`` with
    cross_attn [batch, T, context_dim] float32 and extras holding
    ``pooled_output`` [batch, P] where the family needs it (and FLUX's
    ``guidance``).
    """
    if family not in CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cfg = CONFIGS[family]
    ctx_dim = cfg["context_in_dim"] if family == "flux" else cfg["context_dim"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in ("positive", "negative"):
        cross = torch.randn((batch, COND_TOKENS[family], ctx_dim), generator=gen)
        extras = {}
        if POOLED_DIM[family] is not None:
            extras["pooled_output"] = torch.randn((batch, POOLED_DIM[family]), generator=gen)
        if family == "flux":
            extras["guidance"] = 3.5
        out.append([[cross, extras]])
    return out[0], out[1]


def make_latent(family: str, batch: int = 1, size: int = 8, seed: int = 0):
    """``(latent_image, noise)``: zeros and seeded N(0, 1), both [batch, C, size, size]."""
    shape = (batch, LATENT_CHANNELS[family], size, size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.zeros(shape), torch.randn(shape, generator=gen)


def sample_once(model_patcher, family: str, steps: int = 4, cfg: float = 2.0, seed: int = 0,
                sampler_name: str = "euler", scheduler: str = "normal", size: int = 8):
    """Run ``comfy.sample.sample`` once (txt2img, denoise 1) and return the latent [1, C, size, size]."""
    import comfy.sample

    positive, negative = make_conds(family, seed=seed)
    latent, noise = make_latent(family, size=size, seed=seed)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent, disable_pbar=True, seed=seed)
