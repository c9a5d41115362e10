#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Write the example workflows in workflows/ (UI format) and workflows/api/ (API format).

    python scripts/make_workflows.py            # rewrite every file
    python scripts/make_workflows.py --check    # exit 1 if a file differs from what would be written

One description per workflow produces both formats, so the graph the UI loads
and the prompt scripts POST to /prompt never drift apart.  The UI files use
the graph format of ComfyUI's frontend (``version`` 0.4, links as
``[id, origin, origin_slot, target, target_slot, type]``, socket-only
``inputs``, ``widgets_values`` in the order of the node's widget inputs, a
``"fixed"`` control value after each seed); tests/test_workflows.py checks
them against a running server's /object_info.

Needs only the Python standard library.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "workflows"
API_DIR = UI_DIR / "api"
FRONTEND_VERSION = "1.32.9"  # the frontend ComfyUI 0.3.75 ships; any 1.x loads this format

# Widget inputs of each node type, in the order the frontend creates widgets
# (required then optional inputs, as in the node's definition).  "#control"
# marks the frontend-only "control after generate" value that follows a seed.
WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "ModelSamplingSD3": ["shift"],
    "ModelSamplingAuraFlow": ["shift"],
    "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],
    "SaveAnimatedWEBP": ["filename_prefix", "fps", "lossless", "quality", "method"],
    "VAELoader": ["vae_name"],
    "KLoRASubjectLoader": ["lora_name", "strength", "strength_clip"],
    "KLoRAStyleLoader": ["lora_name", "strength", "strength_clip"],
    "KLoRAFuse": ["pattern", "alpha", "beta", "scope", "outside_scope", "progress_measure", "map_steps", "mode",
                  "flip_cache"],
    "CLIPTextEncode": ["text"],
    "FluxGuidance": ["guidance"],
    "ConditioningZeroOut": [],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "#control", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "VAEEncode": [],
    "LoadImage": ["image", "#upload"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "Note": ["text"],
}
# Socket inputs (name, type) of each node type, in definition order.
SOCKETS = {
    "ModelSamplingSD3": [("model", "MODEL")],
    "ModelSamplingAuraFlow": [("model", "MODEL")],
    "SaveAnimatedWEBP": [("images", "IMAGE")],
    "KLoRASubjectLoader": [("clip", "CLIP")],
    "KLoRAStyleLoader": [("clip", "CLIP")],
    "KLoRAFuse": [("model", "MODEL"), ("subject", "KLORA_SUBJECT"), ("style", "KLORA_STYLE")],
    "CLIPTextEncode": [("clip", "CLIP")],
    "FluxGuidance": [("conditioning", "CONDITIONING")],
    "ConditioningZeroOut": [("conditioning", "CONDITIONING")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "VAEEncode": [("pixels", "IMAGE"), ("vae", "VAE")],
    "ImageScale": [("image", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
    "PreviewImage": [("images", "IMAGE")],
}
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "UNETLoader": [("MODEL", "MODEL")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "ModelSamplingSD3": [("MODEL", "MODEL")],
    "ModelSamplingAuraFlow": [("MODEL", "MODEL")],
    "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    "VAELoader": [("VAE", "VAE")],
    "KLoRASubjectLoader": [("subject", "KLORA_SUBJECT"), ("clip", "CLIP")],
    "KLoRAStyleLoader": [("style", "KLORA_STYLE"), ("clip", "CLIP")],
    "KLoRAFuse": [("model", "MODEL"), ("report", "STRING"), ("selection_map", "IMAGE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "FluxGuidance": [("CONDITIONING", "CONDITIONING")],
    "ConditioningZeroOut": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "VAEEncode": [("LATENT", "LATENT")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageScale": [("IMAGE", "IMAGE")],
}
FRONTEND_ONLY = {"Note"}  # not executed, absent from the API format
TITLES = {"KLoRASubjectLoader": "Load Subject LoRA", "KLoRAStyleLoader": "Load Style LoRA",
          "KLoRAFuse": "K-LoRA Fuse", "CheckpointLoaderSimple": "Load Checkpoint",
          "UNETLoader": "Load Diffusion Model", "VAELoader": "Load VAE", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
          "EmptyLatentImage": "Empty Latent Image", "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode",
          "SaveImage": "Save Image", "PreviewImage": "Preview Image", "LoadImage": "Load Image",
          "ImageScale": "Upscale Image", "CLIPLoader": "Load CLIP", "ModelSamplingSD3": "ModelSamplingSD3",
          "ModelSamplingAuraFlow": "ModelSamplingAuraFlow", "EmptyHunyuanLatentVideo": "Empty HunyuanVideo 1.0 Latent",
          "SaveAnimatedWEBP": "SaveAnimatedWEBP"}


class Graph:
    """A workflow under construction: nodes with widget values and links between sockets."""

    def __init__(self, name: str):
        self.name = name
        self.nodes = []  # dicts: id, type, pos, size, widgets {name: value}, links {input: (src, slot)}, title

    def add(self, node_type, pos, size, widgets=None, links=None, title=None, color=None):
        node_id = len(self.nodes) + 1
        widgets = dict(widgets or {})
        expected = [w for w in WIDGETS[node_type] if not w.startswith("#")]
        if list(widgets) != expected:
            raise ValueError(f"{self.name}: {node_type} widgets {list(widgets)} != {expected}")
        links = dict(links or {})
        sockets = [name for name, _ in SOCKETS.get(node_type, [])]
        unknown = set(links) - set(sockets)
        if unknown:
            raise ValueError(f"{self.name}: {node_type} has no socket {unknown}")
        self.nodes.append({"id": node_id, "type": node_type, "pos": pos, "size": size, "widgets": widgets,
                           "links": links, "title": title, "color": color})
        return node_id

    # ---- UI (graph) format
    def ui(self) -> dict:
        links = []
        outputs = {}  # (node, slot) -> [link ids]
        inputs = {}  # node -> [input dicts]
        for node in self.nodes:
            node_inputs = []
            for name, socket_type in SOCKETS.get(node["type"], []):
                link_id = None
                if name in node["links"]:
                    src, slot = node["links"][name]
                    src_type = OUTPUTS[self.nodes[src - 1]["type"]][slot][1]
                    if src_type != socket_type:
                        raise ValueError(f"{self.name}: link {src}:{slot} ({src_type}) -> {node['id']}.{name} "
                                         f"({socket_type})")
                    link_id = len(links) + 1
                    links.append([link_id, src, slot, node["id"], len(node_inputs), socket_type])
                    outputs.setdefault((src, slot), []).append(link_id)
                node_inputs.append({"name": name, "type": socket_type, "link": link_id})
            inputs[node["id"]] = node_inputs
        order = self._topological_order()
        nodes = []
        for node in self.nodes:
            values = []
            for widget in WIDGETS[node["type"]]:
                if widget == "#control":
                    values.append("fixed")
                elif widget == "#upload":
                    values.append("image")
                else:
                    values.append(node["widgets"][widget])
            out = []
            for slot, (name, out_type) in enumerate(OUTPUTS.get(node["type"], [])):
                entry = {"name": name, "type": out_type, "links": outputs.get((node["id"], slot), [])}
                entry["slot_index"] = slot
                out.append(entry)
            item = {
                "id": node["id"],
                "type": node["type"],
                "pos": node["pos"],
                "size": node["size"],
                "flags": {},
                "order": order[node["id"]],
                "mode": 0,
                "inputs": inputs[node["id"]],
                "outputs": out,
                "properties": {} if node["type"] in FRONTEND_ONLY else {"Node name for S&R": node["type"]},
                "widgets_values": values,
            }
            if node["title"]:
                item["title"] = node["title"]
            if node["color"]:
                item["color"], item["bgcolor"] = node["color"]
            nodes.append(item)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "klora-fusion/workflows/" + self.name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [520, 90]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }

    def _topological_order(self) -> dict:
        done, order = set(), {}
        remaining = list(self.nodes)
        while remaining:
            for node in remaining:
                if all(src in done for src, _ in node["links"].values()):
                    order[node["id"]] = len(order)
                    done.add(node["id"])
                    remaining.remove(node)
                    break
            else:
                raise ValueError(f"{self.name}: the graph has a cycle")
        return order

    # ---- API format
    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            if node["type"] in FRONTEND_ONLY:
                continue
            node_inputs = dict(node["widgets"])
            for name, (src, slot) in node["links"].items():
                node_inputs[name] = [str(src), slot]
            ordered = {}
            for widget in WIDGETS[node["type"]]:  # definition order: widgets and sockets interleaved as defined
                if widget in node_inputs:
                    ordered[widget] = node_inputs.pop(widget)
            ordered.update(node_inputs)
            prompt[str(node["id"])] = {
                "inputs": ordered,
                "class_type": node["type"],
                "_meta": {"title": node["title"] or TITLES.get(node["type"], node["type"])},
            }
        return prompt


FUSE_SIZE = [400, 470]  # the widgets and the live preview; after a run web/klora.js grows it for the report
LOADER_SIZE = [320, 130]

NOTE_COMMON = (
    "K-LoRA picks ONE of the two LoRA deltas for every attention weight at every step: "
    "the subject's where T_S / gamma > T_T * scale(p), else the style's. The live map on "
    "'K-LoRA Fuse' (blue = subject, orange = style) follows alpha, beta, pattern and the loaders "
    "as you edit, and map_steps follows the KSampler's steps; after a run the node shows the report and the "
    "same map for the real run.\n\n"
)

PROMPT = "a sks dog in watercolor painting style"
NOTE_COLOR = ("#432", "#653")
POSITIVE_COLOR = ("#232", "#353")
NEGATIVE_COLOR = ("#322", "#533")


def add_note(g: Graph, height: int, text: str) -> None:
    """The explanation note left of the graph (frontend only; ``height`` in canvas pixels)."""
    g.add("Note", [-420, 40], [380, height], {"text": text}, color=NOTE_COLOR)


def add_lora_loaders(g: Graph, family: str, clip, subject_y: int, style_y: int) -> tuple:
    """Load Subject LoRA -> Load Style LoRA at x = 0 (the example files of ``family``); ``clip`` feeds
    the subject loader's CLIP input, the style loader takes the subject loader's.  Returns both node ids."""
    subject = g.add("KLoRASubjectLoader", [0, subject_y], LOADER_SIZE,
                    {"lora_name": f"subject_sks_dog_{family}.safetensors", "strength": 1.0, "strength_clip": 1.0},
                    {"clip": clip})
    style = g.add("KLoRAStyleLoader", [0, style_y], LOADER_SIZE,
                  {"lora_name": f"style_watercolor_{family}.safetensors", "strength": 1.0, "strength_clip": 1.0},
                  {"clip": (subject, 1)})
    return subject, style


def add_fuse(g: Graph, model, subject: int, style: int, pattern: str, beta: float, map_steps: int) -> int:
    """K-LoRA Fuse with alpha 1.5, attention projections, both LoRAs outside the scope, noise-level progress,
    mode auto."""
    return g.add("KLoRAFuse", [380, 40], FUSE_SIZE,
                 {"pattern": pattern, "alpha": 1.5, "beta": beta, "scope": "attention projections",
                  "outside_scope": "both", "progress_measure": "noise level", "map_steps": map_steps,
                  "mode": "auto", "flip_cache": "auto"},
                 {"model": model, "subject": (subject, 0), "style": (style, 0)})


def add_prompt(g: Graph, clip, y: int, title: str) -> int:
    """The positive prompt (:data:`PROMPT`) at (0, y)."""
    return g.add("CLIPTextEncode", [0, y], [380, 120], {"text": PROMPT}, {"clip": clip}, title=title,
                 color=POSITIVE_COLOR)


def checkpoint_front(g: Graph, ckpt_name: str, family: str, map_steps: int, negative: str) -> tuple:
    """The SD1.5/SDXL layout: checkpoint -> LoRA loaders -> K-LoRA Fuse (pattern s, beta 0.5) and the
    positive and negative prompts.  Returns the node ids ``(ckpt, fuse, positive, negative)``."""
    ckpt = g.add("CheckpointLoaderSimple", [0, 40], [320, 100], {"ckpt_name": ckpt_name})
    subject, style = add_lora_loaders(g, family, (ckpt, 1), 200, 380)
    fuse = add_fuse(g, (ckpt, 0), subject, style, "s", 0.5, map_steps)
    pos = add_prompt(g, (style, 1), 560, "Positive prompt")
    neg = g.add("CLIPTextEncode", [0, 730], [380, 100], {"text": negative}, {"clip": (style, 1)},
                title="Negative prompt", color=NEGATIVE_COLOR)
    return ckpt, fuse, pos, neg


def add_empty_latent(g: Graph, node_type: str, size: int) -> int:
    """An empty ``size`` x ``size`` pixel latent, batch 1 (``EmptyLatentImage`` or ``EmptySD3LatentImage``)."""
    # Below K-LoRA Fuse, which web/klora.js grows after a run (report and map image).
    return g.add(node_type, [380, 960], [300, 110], {"width": size, "height": size, "batch_size": 1})


def add_sampling(g: Graph, fuse: int, positive, negative, latent, vae, steps: int, cfg: float, scheduler: str,
                 denoise: float, prefix: str, sampler_name: str = "euler", save: tuple = None) -> None:
    """KSampler (seed 0) on the fused model -> VAE Decode -> Save Image (``prefix``), and a
    Preview Image of K-LoRA Fuse's selection map.  ``save``: ``(node type, widgets)`` of another
    saving node (an animation for video models) instead of Save Image."""
    sampler = g.add("KSampler", [820, 40], [300, 270],
                    {"seed": 0, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
                     "denoise": denoise},
                    {"model": (fuse, 0), "positive": positive, "negative": negative, "latent_image": latent})
    decode = g.add("VAEDecode", [820, 360], [220, 50], links={"samples": (sampler, 0), "vae": vae})
    save_type, widgets = save or ("SaveImage", {"filename_prefix": prefix})
    g.add(save_type, [1180, 40], [400, 440], widgets, {"images": (decode, 0)})
    g.add("PreviewImage", [820, 460], [320, 360], links={"images": (fuse, 2)}, title="Selection map")


def sdxl() -> Graph:
    g = Graph("klora_sdxl_subject_style")
    add_note(g, 420, (
        "K-LoRA on SDXL: the paper's setting\n\n"
        "Load:\n"
        "- models/checkpoints/sd_xl_base_1.0.safetensors (SDXL base 1.0)\n"
        "- models/loras/: a SUBJECT LoRA for SDXL (e.g. DreamBooth on your dog) and a STYLE LoRA for "
        "SDXL (e.g. a watercolor style). Pick them in 'Load Subject LoRA' / 'Load Style LoRA'.\n\n"
        "Prompt: the paper's template is 'a <trigger> <class> in <style> style'. Here: 'a sks dog in "
        "watercolor painting style': 'sks' is the subject LoRA's DreamBooth token, 'watercolor painting "
        "style' the style LoRA's trigger words. Replace both with YOUR LoRAs' trigger words.\n\n"
        + NOTE_COMMON +
        "Defaults as in the paper: pattern s, alpha 1.5, beta 0.5, attention projections, "
        "50 steps. Higher beta or alpha favours the style."
    ))
    ckpt, fuse, pos, neg = checkpoint_front(g, "sd_xl_base_1.0.safetensors", "sdxl", 50, "")
    latent = add_empty_latent(g, "EmptyLatentImage", 1024)
    add_sampling(g, fuse, (pos, 0), (neg, 0), (latent, 0), (ckpt, 2), 50, 5.0, "normal", 1.0, "klora/sdxl")
    return g


def flux() -> Graph:
    g = Graph("klora_flux_s_star")
    add_note(g, 460, (
        "K-LoRA on FLUX.1 with pattern s* (the paper's supplement; the authors' scripts default to it)\n\n"
        "Load:\n"
        "- models/diffusion_models/flux1-dev.safetensors\n"
        "- models/text_encoders/clip_l.safetensors and t5xxl_fp16.safetensors (or the fp8 t5)\n"
        "- models/vae/ae.safetensors\n"
        "- models/loras/: a SUBJECT LoRA and a STYLE LoRA trained for FLUX.1-dev.\n\n"
        "Prompt: 'a sks dog in watercolor painting style': replace 'sks dog' with your subject LoRA's "
        "trigger word and class, and 'watercolor painting style' with your style LoRA's trigger words.\n\n"
        + NOTE_COMMON +
        "s*: scale(p) = (alpha*p + beta) mod alpha with alpha 1.5, beta 1.275 (= 0.85 * alpha): the style "
        "leads the first ~15% of the steps (colours, background), then the subject, then the style again. "
        "FLUX LoRAs rarely train the text encoders: the CLIP chain through the loaders is harmless."
    ))
    unet = g.add("UNETLoader", [0, 40], [320, 90], {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"})
    clip = g.add("DualCLIPLoader", [0, 170], [320, 130],
                 {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                  "device": "default"})
    vae = g.add("VAELoader", [0, 340], [320, 60], {"vae_name": "ae.safetensors"})
    subject, style = add_lora_loaders(g, "flux", (clip, 0), 440, 610)
    fuse = add_fuse(g, (unet, 0), subject, style, "s*", 1.275, 28)
    pos = add_prompt(g, (style, 1), 800, "Prompt")
    guidance = g.add("FluxGuidance", [0, 970], [300, 60], {"guidance": 3.5}, {"conditioning": (pos, 0)})
    negative = g.add("ConditioningZeroOut", [0, 1080], [240, 30], links={"conditioning": (pos, 0)})
    latent = add_empty_latent(g, "EmptySD3LatentImage", 1024)
    add_sampling(g, fuse, (guidance, 0), (negative, 0), (latent, 0), (vae, 0), 28, 1.0, "simple", 1.0, "klora/flux")
    return g


def sd15() -> Graph:
    g = Graph("klora_sd15")
    add_note(g, 400, (
        "K-LoRA on Stable Diffusion 1.5\n\n"
        "Load:\n"
        "- models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors (or any SD1.5 checkpoint)\n"
        "- models/loras/: a SUBJECT LoRA and a STYLE LoRA trained for SD1.5 (kohya, diffusers and PEFT "
        "files all work).\n\n"
        "Prompt: 'a sks dog in watercolor painting style': 'sks dog' is the subject LoRA's trigger word "
        "and class, 'watercolor painting style' the style LoRA's trigger words; use your LoRAs' own.\n\n"
        + NOTE_COMMON +
        "Pattern s, alpha 1.5, beta 0.5, 30 steps."
    ))
    ckpt, fuse, pos, neg = checkpoint_front(g, "v1-5-pruned-emaonly-fp16.safetensors", "sd15", 30,
                                            "blurry, low quality")
    latent = add_empty_latent(g, "EmptyLatentImage", 512)
    add_sampling(g, fuse, (pos, 0), (neg, 0), (latent, 0), (ckpt, 2), 30, 7.5, "normal", 1.0, "klora/sd15")
    return g


def img2img() -> Graph:
    g = Graph("klora_img2img")
    add_note(g, 480, (
        "K-LoRA image-to-image (SD1.5)\n\n"
        "Load:\n"
        "- models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors (or any SD1.5 checkpoint)\n"
        "- models/loras/: a SUBJECT LoRA and a STYLE LoRA trained for SD1.5\n"
        "- an input picture in 'Load Image' (upload your own; example.png ships with ComfyUI)\n\n"
        "Prompt: 'a sks dog in watercolor painting style': replace 'sks dog' and 'watercolor painting "
        "style' with your LoRAs' trigger words.\n\n"
        + NOTE_COMMON +
        "With denoise 0.6 the sampler starts part-way into the noise schedule. progress_measure "
        "'noise level' measures K-LoRA's progress p on the model's own schedule, so the run starts at "
        "p of about 0.4 and the subject-only early steps are skipped: the style is stronger than in "
        "text-to-image. Lower beta (e.g. 0.3) to give the subject more weight."
    ))
    ckpt, fuse, pos, neg = checkpoint_front(g, "v1-5-pruned-emaonly-fp16.safetensors", "sd15", 30,
                                            "blurry, low quality")
    image = g.add("LoadImage", [380, 960], [300, 320], {"image": "example.png"})
    scaled = g.add("ImageScale", [380, 1320], [300, 130],
                   {"upscale_method": "bicubic", "width": 512, "height": 512, "crop": "center"},
                   {"image": (image, 0)})
    encode = g.add("VAEEncode", [820, 960], [220, 50], links={"pixels": (scaled, 0), "vae": (ckpt, 2)})
    add_sampling(g, fuse, (pos, 0), (neg, 0), (encode, 0), (ckpt, 2), 30, 7.5, "normal", 0.6, "klora/img2img")
    return g


def diffusion_model_front(g: Graph, family: str, title: str, files: tuple, clip_type: str, sampling: tuple,
                          map_steps: int, trained_for: str, remark: str) -> tuple:
    """The layout of a diffusion-model family: note, UNETLoader -> ModelSampling* (shift) -> K-LoRA Fuse
    (pattern s, beta 0.5), CLIPLoader -> the two LoRA loaders -> the prompt.  ``files``: (diffusion model,
    text encoder, VAE, a remark on the model file) ; ``sampling``: (node type, shift); ``trained_for``: the
    model the LoRAs need.  Returns ``(fuse, positive, style loader, vae)``."""
    unet_name, clip_name, vae_name, unet_remark = files
    add_note(g, 520, (
        f"K-LoRA on {title}\n\nLoad:\n"
        f"- models/diffusion_models/{unet_name}{unet_remark}\n"
        f"- models/text_encoders/{clip_name}\n"
        f"- models/vae/{vae_name}\n"
        f"- models/loras/: a SUBJECT LoRA and a STYLE LoRA trained for {trained_for}.\n\n"
        + NOTE_FAMILY + " " + remark))
    unet = g.add("UNETLoader", [0, 40], [320, 90], {"unet_name": unet_name, "weight_dtype": "default"})
    clip = g.add("CLIPLoader", [0, 170], [320, 110], {"clip_name": clip_name, "type": clip_type, "device": "default"})
    vae = g.add("VAELoader", [0, 320], [320, 60], {"vae_name": vae_name})
    shifted = g.add(sampling[0], [0, 420], [320, 60], {"shift": sampling[1]}, {"model": (unet, 0)})
    subject, style = add_lora_loaders(g, family, (clip, 0), 520, 690)
    fuse = add_fuse(g, (shifted, 0), subject, style, "s", 0.5, map_steps)
    pos = add_prompt(g, (style, 1), 880, "Prompt")
    return fuse, pos, style, vae


def add_negative(g: Graph, clip, y: int, text: str) -> int:
    """The negative prompt at (0, y)."""
    return g.add("CLIPTextEncode", [0, y], [380, 100], {"text": text}, {"clip": clip}, title="Negative prompt",
                 color=NEGATIVE_COLOR)


NOTE_FAMILY = (
    "Prompt: 'a sks dog in watercolor painting style': replace 'sks dog' with your subject LoRA's "
    "trigger word and class, and 'watercolor painting style' with your style LoRA's trigger words.\n\n"
    + NOTE_COMMON +
    "LoRA files from musubi-tuner, diffusion-pipe, ai-toolkit, diffusers/PEFT or OneTrainer all load "
    "(docs/families.md); subject and style may come from different trainers. Pattern s, alpha 1.5, "
    "beta 0.5."
)


def wan_t2v() -> Graph:
    g = Graph("klora_wan_t2v")
    fuse, pos, style, vae = diffusion_model_front(
        g, "wan", "Wan 2.x text-to-video",
        ("wan2.1_t2v_1.3B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors",
         " (or the 14B model, or Wan 2.2 TI2V 5B with its wan2.2_vae)"), "wan", ("ModelSamplingSD3", 8.0), 30,
        "the same Wan model", "K-LoRA switches every self- and cross-attention projection of every block.")
    neg = add_negative(g, (style, 1), 1050, "blurry, static, low quality, deformed")
    latent = g.add("EmptyHunyuanLatentVideo", [380, 800], [300, 130],
                   {"width": 832, "height": 480, "length": 33, "batch_size": 1})
    add_sampling(g, fuse, (pos, 0), (neg, 0), (latent, 0), (vae, 0), 30, 6.0, "simple", 1.0, "klora/wan",
                 sampler_name="uni_pc", save=("SaveAnimatedWEBP", {"filename_prefix": "klora/wan", "fps": 16.0,
                                                                    "lossless": False, "quality": 90,
                                                                    "method": "default"}))
    return g


def qwen_image() -> Graph:
    g = Graph("klora_qwen_image")
    fuse, pos, style, vae = diffusion_model_front(
        g, "qwen_image", "Qwen-Image",
        ("qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image_vae.safetensors",
         ""), "qwen_image", ("ModelSamplingAuraFlow", 3.1), 20, "Qwen-Image",
        "K-LoRA switches the image and text streams' attention projections.")
    neg = add_negative(g, (style, 1), 1050, " ")
    latent = add_empty_latent(g, "EmptySD3LatentImage", 1328)
    add_sampling(g, fuse, (pos, 0), (neg, 0), (latent, 0), (vae, 0), 20, 2.5, "simple", 1.0, "klora/qwen_image")
    return g


def z_image() -> Graph:
    g = Graph("klora_z_image")
    fuse, pos, _style, vae = diffusion_model_front(
        g, "z_image", "Z-Image (Turbo)",
        ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors", ""), "lumina2",
        ("ModelSamplingAuraFlow", 3.0), 9, "Z-Image",
        "Turbo samples in 9 steps at cfg 1; K-LoRA switches every attention qkv and out "
        "projection, the refiners' included. The VAE is FLUX.1's ae.safetensors.")
    negative = g.add("ConditioningZeroOut", [0, 1050], [240, 30], links={"conditioning": (pos, 0)})
    latent = add_empty_latent(g, "EmptySD3LatentImage", 1024)
    add_sampling(g, fuse, (pos, 0), (negative, 0), (latent, 0), (vae, 0), 9, 1.0, "simple", 1.0, "klora/z_image",
                 sampler_name="res_multistep")
    return g


WORKFLOWS = (sdxl, flux, sd15, img2img, wan_t2v, qwen_image, z_image)


def rendered() -> dict:
    """``{path: text}`` of every file this script writes."""
    files = {}
    for make in WORKFLOWS:
        graph = make()
        files[UI_DIR / f"{graph.name}.json"] = json.dumps(graph.ui(), indent=2, ensure_ascii=False) + "\n"
        files[API_DIR / f"{graph.name}.json"] = json.dumps(graph.api(), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print("out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    for path in stale if not args.check else []:
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
