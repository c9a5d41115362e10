# SPDX-License-Identifier: GPL-3.0-or-later
"""The full-size SDXL UNet of the flips benchmark, with seeded random weights built at benchmark time.

The weights go to a temporary raw file that every benchmark process maps
(copy-on-write) instead of holding its own anonymous copy; it is deleted at
the end, like the two LoRA files.  The
UNet config is SDXL's as ComfyUI detects it from a checkpoint
(``comfy/model_detection.py``, ``unet_config_from_diffusers_unet``: the
``SDXL`` entry), written out here because ComfyUI keeps it inside a function;
``model_config_from_unet_config`` must recognise it as ``SDXL`` (the tiny
``--quick`` variant is built with the same model class, unchecked).
2,567 M parameters; 70 transformer blocks, 560 attention projections.
"""
from __future__ import annotations

from pathlib import Path

import common

SDXL_FULL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

#: --quick: the tests' tiny SDXL-shaped UNet (model_channels 32, one transformer block per level).
SDXL_TINY = {
    **SDXL_FULL, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
    "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1],
}

DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _skeleton(config: dict, dtype: str):
    """ComfyUI's SDXL model for ``config`` with uninitialised weights of ``dtype`` (not yet resident)."""
    import torch
    import comfy.model_detection
    import comfy.supported_models

    if config is SDXL_FULL:
        detected = comfy.model_detection.model_config_from_unet_config(dict(config))
        if type(detected).__name__ != "SDXL":
            raise RuntimeError(f"ComfyUI detects this config as {type(detected).__name__}, not SDXL")
    model_config = comfy.supported_models.SDXL(dict(config))
    weight_dtype = torch_dtype(dtype)
    # On the CPU compute runs in float32 whatever the stored dtype (ComfyUI's manual cast).
    model_config.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
    model = model_config.get_model({}, device=torch.device("cpu"))
    model.eval()
    model.requires_grad_(False)
    return model


def _random_values(name: str, shape, gen):
    """Seeded float32 values: N(0, 1/fan_in) for matrices and convs, 1 for norm weights, 0 for biases."""
    import torch

    values = torch.empty(shape, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = values[0].numel()
        values.normal_(0.0, 1.0 / max(fan_in, 1) ** 0.5, generator=gen)
    else:
        values.fill_(1.0 if name.endswith("weight") else 0.0)
    return values


def write_weights(config: dict, dtype: str, path: Path, seed: int = 0) -> int:
    """Write the UNet's seeded random weights to ``path`` (raw, sorted by name); return the bytes written."""
    import torch

    params = dict(_skeleton(config, dtype).diffusion_model.named_parameters())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    written = 0
    with open(path, "wb") as f:
        for name in sorted(params):
            raw = _random_values(name, params[name].shape, gen).to(params[name].dtype).view(-1)
            raw = raw.view(torch.uint8) if raw.element_size() == 1 else raw.view({2: torch.int16, 4: torch.int32}[
                raw.element_size()])
            raw.numpy().tofile(f)
            written += raw.numel() * raw.element_size()
    return written


def build_model(config: dict, device: str, dtype: str = "fp32", seed: int = 0, weights_file=None):
    """A ModelPatcher (load device ``device``, offload CPU) around the SDXL UNet of ``config``.

    With ``weights_file`` (written by :func:`write_weights`) the weights are copy-on-write views of that file
    mapped into memory: the unpatched weights live in the page cache, which the kernel can reclaim, so the
    processes sharing this machine are not pushed out of memory; only what ComfyUI and K-LoRA allocate
    (baked weights, kept variants) is anonymous memory.  Without it they are filled in memory.
    """
    import numpy as np
    import torch
    import comfy.model_patcher
    import comfy.utils

    model = _skeleton(config, dtype)
    unet = model.diffusion_model
    params = dict(unet.named_parameters())
    if weights_file is not None:
        flat = torch.from_numpy(np.memmap(weights_file, dtype=np.uint8, mode="c")).view(torch_dtype(dtype))
        offset = 0
        for name in sorted(params):
            count = params[name].numel()
            comfy.utils.set_attr_param(unet, name, flat[offset:offset + count].view(params[name].shape))
            offset += count
        if offset != flat.numel():
            raise RuntimeError(f"{weights_file} holds {flat.numel()} weights, the model {offset}")
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name in sorted(params):
            params[name].copy_(_random_values(name, params[name].shape, gen))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))


def make_pair_files(model_patcher, ranks: tuple, folder: Path) -> list:
    """A kohya subject LoRA of rank ``ranks[0]`` and style LoRA of rank ``ranks[1]`` on every attention
    projection (float16 tensors, alpha = rank, up scaled by 0.1 so deltas stay below the weights)."""
    from support import lora_factory  # tests/support/lora_factory.py

    paths = []
    for role, rank, seed in (("subject", ranks[0], 1000 + ranks[0]), ("style", ranks[1], 2000 + ranks[1])):
        import torch

        sd, _ = lora_factory.make_lora(model_patcher, style="kohya", rank=rank, alpha=float(rank), scope="attn",
                                       seed=seed, dtype=torch.float16, scale=0.1)
        path = folder / f"{role}_r{rank}.safetensors"
        lora_factory.save_lora(sd, path)
        paths.append(path)
        del sd
    return paths


def conds_and_latent(config: dict, size_px: int, seed: int = 0):
    """Positive / negative SDXL conds (77 tokens, pooled 1280) and a zero latent + noise for ``size_px``."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    side = size_px // 8
    conds = []
    for _ in range(2):
        cross = torch.randn((1, 77, config["context_dim"]), generator=gen)
        conds.append([[cross, {"pooled_output": torch.randn((1, 1280), generator=gen), "width": size_px,
                               "height": size_px, "target_width": size_px, "target_height": size_px}]])
    latent = torch.zeros((1, 4, side, side))
    noise = torch.randn((1, 4, side, side), generator=gen)
    return conds[0], conds[1], latent, noise


def sample(model_patcher, settings: dict, conds, seed: int, callback=None):
    import comfy.sample

    positive, negative, latent, noise = conds
    return comfy.sample.sample(model_patcher, noise, settings["steps"], settings["cfg"], settings["sampler"],
                               settings["scheduler"], positive, negative, latent, disable_pbar=True, seed=seed,
                               callback=callback)


def count_params(model_patcher) -> int:
    return sum(p.numel() for p in model_patcher.model.diffusion_model.parameters())


def setup(device: str):
    """Import ComfyUI (CPU only unless ``device`` is cuda) and the tests' helpers; return comfy_env."""
    import sys

    if str(common.TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(common.TESTS_DIR))
    from support import comfy_env

    comfy_env.setup_comfy(cpu=device == "cpu")
    return comfy_env
