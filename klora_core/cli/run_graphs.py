# SPDX-License-Identifier: GPL-3.0-or-later
"""The workflow ``python -m klora_core run`` posts to ComfyUI, in API format.

Loaders -> Load Subject LoRA -> Load Style LoRA -> K-LoRA Fuse -> CLIP text
encode -> KSampler -> VAE decode -> SaveImage (the image), plus a SaveImage of
K-LoRA Fuse's selection map.  Node ids are fixed (:data:`IDS`) so that the run
command and the tests find each node's outputs in ComfyUI's history entry.
"""
from __future__ import annotations

from ..options import CLI_MEASURES, CLI_SCOPES, STEPS

#: Node ids of the workflow (API format), kept stable so reports and tests can find nodes.
IDS = {
    "model": "1", "clip": "2", "vae": "3", "subject": "4", "style": "5", "fuse": "6", "positive": "7",
    "negative": "8", "latent": "9", "sampler": "10", "decode": "11", "save": "12", "map": "13",
}


def build_workflow(opts, names: dict, seed: int, alpha: float, beta: float, prefix: str) -> dict:
    """The API-format workflow: loaders -> Load Subject/Style LoRA -> K-LoRA Fuse -> KSampler -> decode -> save.

    ``names``: ComfyUI file names, keys ``checkpoint`` or ``unet``/``clip``/``vae``,
    plus ``subject`` and ``style``.
    """
    g = {}
    i = IDS
    if names.get("checkpoint"):
        g[i["model"]] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoint"]}}
        model, clip, vae = [i["model"], 0], [i["model"], 1], [i["model"], 2]
    else:
        g[i["model"]] = {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}}
        g[i["clip"]] = {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}}
        g[i["vae"]] = {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}}
        model, clip, vae = [i["model"], 0], [i["clip"], 0], [i["vae"], 0]
    g[i["subject"]] = {"class_type": "KLoRASubjectLoader", "inputs": {
        "lora_name": names["subject"], "strength": opts.subject_strength, "clip": clip, "strength_clip": 1.0}}
    g[i["style"]] = {"class_type": "KLoRAStyleLoader", "inputs": {
        "lora_name": names["style"], "strength": opts.style_strength, "clip": [i["subject"], 1], "strength_clip": 1.0}}
    g[i["fuse"]] = {"class_type": "KLoRAFuse", "inputs": {
        "model": model, "subject": [i["subject"], 0], "style": [i["style"], 0], "pattern": opts.pattern,
        "alpha": float(alpha), "beta": float(beta), "scope": CLI_SCOPES[opts.scope],
        "outside_scope": opts.outside_scope, "progress_measure": CLI_MEASURES[opts.progress_measure],
        "map_steps": max(STEPS.lo, min(STEPS.hi, opts.steps))}}
    g[i["positive"]] = {"class_type": "CLIPTextEncode", "inputs": {"text": opts.prompt, "clip": [i["style"], 1]}}
    g[i["negative"]] = {"class_type": "CLIPTextEncode", "inputs": {"text": opts.negative, "clip": [i["style"], 1]}}
    g[i["latent"]] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": opts.width, "height": opts.height, "batch_size": 1}}
    g[i["sampler"]] = {"class_type": "KSampler", "inputs": {
        "model": [i["fuse"], 0], "seed": int(seed), "steps": opts.steps, "cfg": opts.cfg,
        "sampler_name": opts.sampler, "scheduler": opts.scheduler, "positive": [i["positive"], 0],
        "negative": [i["negative"], 0], "latent_image": [i["latent"], 0], "denoise": 1.0}}
    g[i["decode"]] = {"class_type": "VAEDecode", "inputs": {"samples": [i["sampler"], 0], "vae": vae}}
    g[i["save"]] = {"class_type": "SaveImage", "inputs": {"images": [i["decode"], 0], "filename_prefix": prefix}}
    g[i["map"]] = {"class_type": "SaveImage", "inputs": {"images": [i["fuse"], 2],
                                                          "filename_prefix": prefix + "_selection_map"}}
    return g


NODE_LABELS = {
    IDS["model"]: "load model", IDS["clip"]: "load text encoder", IDS["vae"]: "load VAE",
    IDS["subject"]: "Load Subject LoRA", IDS["style"]: "Load Style LoRA", IDS["fuse"]: "K-LoRA Fuse (scoring)",
    IDS["positive"]: "encode prompt", IDS["negative"]: "encode negative", IDS["latent"]: "empty latent",
    IDS["sampler"]: "KSampler", IDS["decode"]: "VAE decode", IDS["save"]: "save image", IDS["map"]: "save map",
}
