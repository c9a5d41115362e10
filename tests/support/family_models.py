"""Every model family the pack supports, as tiny seeded ComfyUI models (CPU, float32, a few MB).

    from support import family_models as fm
    spec = fm.FAMILIES["wan21_t2v"]                  # the table: support/family_specs.py
    model = fm.build_model("wan21_t2v", seed=0)     # comfy ModelPatcher
    positive, negative = fm.make_conds("wan21_t2v", seed=0)
    latent, noise = fm.make_latent("wan21_t2v", seed=0)

Many families have fixed widths in ComfyUI's model detection
(``comfy/model_detection.py``: e.g. FLUX hidden 3072, HiDream 20 x 128 heads),
so their smallest natively detected checkpoint is hundreds of MB.  Each
family here is the SAME ComfyUI model class with the same key layout at a
reduced width, loaded the way ``comfy.sd.load_diffusion_model_state_dict``
loads a checkpoint once it knows the config class (:func:`load_with_class`):
``config_class(unet_config)`` -> ``set_inference_dtype`` ->
``process_unet_state_dict`` -> ``get_model`` -> load the weights ->
``ModelPatcher``.  Specs marked ``native`` (Wan 2.1, HunyuanVideo at their
smallest detectable width) go through ComfyUI's own detection instead
(:func:`load_detected`).  The state dict loaded is a seeded ``N(0, 1) * 0.05``
fill of the model's parameters and stored buffers (:func:`seeded_state_dict`):
same seed, same weights, bit for bit.

:func:`expected_attention_keys` and :func:`expected_block` apply the spec's
architecture regexes; the family-matrix tests hold the product to them.

Families whose model class is missing from the ComfyUI in use (Kandinsky5
before 0.8) are reported by :func:`available`, never silently dropped: tests
skip them with the reason.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch

from support.comfy_env import setup_comfy
from support.family_specs import FAMILIES, NAMES, FamilySpec, spec_of  # noqa: F401  (re-exported)

STD = 0.05


def config_class(name):
    """The ``comfy.supported_models`` class of a family, or None when this ComfyUI lacks it."""
    setup_comfy()
    import comfy.supported_models

    return getattr(comfy.supported_models, spec_of(name).config_class, None)


def available(name) -> Optional[str]:
    """None when the family can be built on this ComfyUI, else the reason it cannot."""
    if config_class(name) is None:
        return f"this ComfyUI has no comfy.supported_models.{spec_of(name).config_class}"
    return None


def _unet_config(spec: FamilySpec) -> dict:
    """The spec's config plus the optional keys this ComfyUI's model class takes (feature-detected).

    E.g. 0.8.0's ``FluxParams`` requires ``txt_ids_dims``, which 0.3.75's rejects.
    """
    config = dict(spec.unet_config)
    if spec.optional_config:
        accepted = _accepted_keys(spec.params_class)
        config.update({k: v for k, v in spec.optional_config.items() if k in accepted})
    return config


def _accepted_keys(dotted: str) -> set:
    import importlib
    import inspect

    setup_comfy()
    module_name, _, attr = dotted.rpartition(".")
    target = getattr(importlib.import_module(module_name), attr)
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target)}
    return set(inspect.signature(target.__init__).parameters)


def fill_seeded_(module: torch.nn.Module, seed: int, std: float = STD) -> None:
    """Overwrite every parameter of ``module`` in place with ``N(0, 1) * std``, in sorted name order.

    Then, from the same generator, every floating buffer a checkpoint stores
    (SD3's ``pos_embed``, PixArt's ``y_embedding``): ComfyUI allocates those
    with ``torch.empty`` and loads them from the file, so left alone they would
    differ between two builds.  Parameters come first, so models without such
    buffers get exactly tiny_models' weights.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = dict(module.named_parameters())
    stored = module.state_dict(keep_vars=True)
    buffers = {k: v for k, v in stored.items() if k not in params and v.is_floating_point()}
    with torch.no_grad():
        for group in (params, buffers):
            for name in sorted(group):
                p = group[name]
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float32) * std).to(p.dtype))


def _new_model(spec: FamilySpec, state_dict=None):
    cls = config_class(spec)
    if cls is None:
        raise RuntimeError(available(spec))
    model_config = cls(_unet_config(spec))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict or {}, "", device=torch.device("cpu"))
    return model_config, model


_STATE_DICTS: dict = {}


def seeded_state_dict(name, seed: int = 0, std: float = STD) -> dict:
    """The diffusion model's state dict (no prefix) as a checkpoint of the family would hold it, seeded.

    Cached per (family, seed, std): building a model costs more than its
    weights (Stable Cascade's sampling table alone takes ~1 s).  Callers get a
    new dict of the cached tensors and must not modify them in place.
    """
    spec = spec_of(name)
    key = (spec.name, seed, std)
    if key not in _STATE_DICTS:
        _, model = _new_model(spec)
        fill_seeded_(model.diffusion_model, seed, std)
        _STATE_DICTS[key] = {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}
    return dict(_STATE_DICTS[key])


def load_with_class(name, state_dict: dict):
    """Load ``state_dict`` as ``comfy.sd.load_diffusion_model_state_dict`` does, with the config class given.

    Returns a CPU ModelPatcher.  Raises when a key is missing or unexpected,
    so a state dict with another layout never loads silently.
    """
    setup_comfy()
    import comfy.model_patcher

    spec = spec_of(name)
    cls = config_class(spec)
    model_config = cls(_unet_config(spec))
    model_config.set_inference_dtype(torch.float32, None)
    sd = model_config.process_unet_state_dict(dict(state_dict))
    model = model_config.get_model(sd, "", device=torch.device("cpu"))
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{spec.title}: state dict does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def load_detected(name, state_dict: dict):
    """Load ``state_dict`` through ComfyUI's own detection; it must pick the spec's config class."""
    setup_comfy()
    import comfy.sd

    spec = spec_of(name)
    model = comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options={"dtype": torch.float32})
    detected = type(model.model.model_config).__name__ if model is not None else None
    if detected != spec.config_class:
        raise RuntimeError(f"{spec.title}: ComfyUI detected {detected}, expected {spec.config_class}")
    return model


def build_model(name, seed: int = 0):
    """A tiny float32 ModelPatcher of the family, seeded (same seed, same weights)."""
    loader = load_detected if spec_of(name).native else load_with_class
    return loader(name, seeded_state_dict(name, seed))


def make_conds(name, batch: int = 1, seed: int = 0):
    """``(positive, negative)`` CONDITIONING lists ``[[cross_attn [B, T, C], extras]]``, seeded."""
    spec = spec_of(name)
    tokens, width = spec.context
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in ("positive", "negative"):
        cross = torch.randn((batch, tokens, width), generator=gen)
        extras = spec.extras(batch, gen) if spec.extras is not None else {}
        out.append([[cross, extras]])
    return out[0], out[1]


def make_latent(name, batch: int = 1, seed: int = 0):
    """``(latent_image, noise)``: zeros and seeded N(0, 1), both ``[batch, *spec.latent]``."""
    shape = (batch,) + tuple(spec_of(name).latent)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.zeros(shape), torch.randn(shape, generator=gen)


def sample(model_patcher, name, steps: int = None, cfg: float = None, seed: int = 0, sampler: str = "euler",
           scheduler: str = "simple", batch: int = 1, **kwargs):
    """One ``comfy.sample.sample`` run (txt2img/txt2video, denoise 1) of the family; returns the latent."""
    import comfy.sample

    spec = spec_of(name)
    steps = spec.steps if steps is None else steps
    cfg = spec.cfg if cfg is None else cfg
    positive, negative = make_conds(spec, batch=batch, seed=seed)
    latent, noise = make_latent(spec, batch=batch, seed=seed)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=seed, **kwargs)


def expected_attention_keys(model_patcher, name) -> list:
    """Model weight keys the spec's architecture regex names as attention projections (sorted)."""
    pattern = re.compile(spec_of(name).attention)
    out = []
    for key, tensor in model_patcher.model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and tensor.ndim >= 2:
            if pattern.fullmatch(key[len("diffusion_model."):-len(".weight")]):
                out.append(key)
    return sorted(out)


def expected_block(name, key: str) -> str:
    """The block of weight ``key`` by the spec's block regex (what the selection map should group by)."""
    m = re.search(spec_of(name).blocks, key)
    if m is None:
        raise AssertionError(f"{key}: no block by {spec_of(name).blocks!r}")
    return m.group(0)


def family_of_model(model_patcher) -> str:
    """The family name of a model built here (by its config class; FLUX vs Chroma etc. by class name)."""
    cls_name = type(model_patcher.model.model_config).__name__
    for spec in FAMILIES.values():
        if spec.config_class == cls_name:
            return spec.name
    raise ValueError(f"no family spec for config class {cls_name}")


def megabytes(model_patcher) -> float:
    return sum(t.numel() * t.element_size() for t in model_patcher.model.state_dict().values()) / 2**20


__all__ = ["FamilySpec", "FAMILIES", "NAMES", "available", "build_model", "make_conds", "make_latent", "sample",
           "expected_attention_keys", "expected_block", "family_of_model", "load_with_class", "seeded_state_dict"]
