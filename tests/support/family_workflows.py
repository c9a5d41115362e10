"""Running the model-family example workflows (Wan, Qwen-Image, Z-Image) on tiny models through a real server.

    files = family_workflows.write_files(live.server, "klora_wan_t2v")
    prompt = family_workflows.adapt_api(workflow_tools.load_api("klora_wan_t2v"), files)

Per workflow (:data:`RUNS`), written into the server's model folders:

- the diffusion model at test size (tests/support/family_models.py).  Wan 2.1
  is natively detectable at 128 wide, so ``UNETLoader`` loads it as written.
  Qwen-Image and Z-Image are not (ComfyUI's detection fixes their full-size
  widths): their ``UNETLoader`` becomes the test-only ``KLoRATestDiffusionModel``
  (tests/support/comfy_test_nodes), which loads the file with its config class
  given, as ``comfy.sd.load_diffusion_model_state_dict`` does once it knows the class;
- a subject and a style LoRA in two different trainers' namings
  (tests/support/trainer_names.py), loaded by the workflow's K-LoRA loaders;
- a small VAE ``VAELoader`` detects: TAEHV (the tiny Wan 2.1 VAE) for Wan and
  Qwen-Image (whose VAE is Wan 2.1's), 16-channel TAESD for Z-Image (FLUX's VAE).

``CLIPLoader`` + ``CLIPTextEncode`` become ``KLoRATestConditioning`` (seeded
conditioning of the family's text width): the families' text encoders have
fixed multi-GB sizes.  Everything else runs as written: ModelSampling*, the
K-LoRA loaders and Fuse, KSampler, VAEDecode, the saving and preview nodes.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

SMALL_PIXELS = 64
SMALL_STEPS = 3
SMALL_FRAMES = 5  # 2 latent frames


@dataclass(frozen=True)
class Run:
    family: str  # family_models name
    detected: bool  # UNETLoader detects the tiny model
    subject_style: str  # lora_factory naming styles
    style_style: str
    vae: str  # "taehv" or "taesd16"


RUNS = {
    "klora_wan_t2v": Run("wan21_t2v_native", True, "kohya", "diffusers", "taehv"),
    "klora_qwen_image": Run("qwen_image", False, "diffusers", "comfy_peft", "taehv"),  # Wan 2.1 VAE latents
    "klora_z_image": Run("z_image", False, "kohya_diffusers", "zimage_names", "taesd16"),
}
NAMES = tuple(RUNS)
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"


def _save(state_dict: dict, path: Path, metadata: dict = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path), metadata=metadata)


def _vae_state_dict(kind: str) -> dict:
    """A seeded VAE ComfyUI's ``VAELoader`` detects (``comfy.sd.VAE``): TAEHV (16-channel video) or TAESD."""
    from support import family_models

    if kind == "taehv":
        from comfy.taesd.taehv import TAEHV

        vae = TAEHV(latent_channels=16)  # float32 file: read as lighttaew2_1 (no latent scaling)
    else:
        from comfy.taesd.taesd import TAESD

        vae = TAESD(latent_channels=16)
    family_models.fill_seeded_(vae, seed=3)
    sd = vae.state_dict()
    if kind != "taehv":
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return sd


def write_files(server, name: str) -> dict:
    """Write the run's model, LoRAs and VAE into ``server``'s folders; returns the names the prompt uses.

    ``{"unet", "vae", "subject", "style", "tokens", "width", "subject_tensors", "style_tensors"}``.
    """
    from support import family_models as fm
    from support import lora_factory
    from support.comfy_env import setup_comfy

    setup_comfy()  # before comfy.taesd is imported for the VAE
    run = RUNS[name]
    spec = fm.FAMILIES[run.family]
    stem = f"klora-test-{run.family}"
    state = fm.seeded_state_dict(run.family, seed=0)
    metadata = None
    if not run.detected:
        metadata = {"klora_test_config_class": spec.config_class,
                    "klora_test_unet_config": json.dumps(fm._unet_config(spec))}
    _save(state, Path(server.unet_dir) / f"{stem}.safetensors", metadata)
    _save(_vae_state_dict(run.vae), Path(server.vae_dir) / f"{stem}-{run.vae}.safetensors")
    model = fm.build_model(run.family)
    sd_s, _ = lora_factory.make_lora(model, run.subject_style, rank=4, alpha=2.0, seed=11)
    sd_t, _ = lora_factory.make_lora(model, run.style_style, rank=2, seed=22)
    _save(sd_s, Path(server.loras_dir) / f"{stem}-subject-{run.subject_style}.safetensors")
    _save(sd_t, Path(server.loras_dir) / f"{stem}-style-{run.style_style}.safetensors")
    tokens, width = spec.context
    return {"unet": f"{stem}.safetensors", "vae": f"{stem}-{run.vae}.safetensors",
            "subject": f"{stem}-subject-{run.subject_style}.safetensors",
            "style": f"{stem}-style-{run.style_style}.safetensors", "tokens": tokens, "width": width,
            "subject_tensors": len(sd_s), "style_tensors": len(sd_t), "detected": run.detected}


def adapt_api(prompt: dict, files: dict) -> dict:
    """The workflow's API prompt on the tiny files (see module docstring); sizes 64 px, 3 steps, 5 frames."""
    out = copy.deepcopy(prompt)
    seeds = iter(range(1, 100))
    for node_id in [k for k, v in out.items() if v["class_type"] == "CLIPLoader"]:
        del out[node_id]
    for node in out.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CLIPTextEncode":
            node["class_type"] = "KLoRATestConditioning"
            node["inputs"] = {"tokens": files["tokens"], "width": files["width"], "seed": next(seeds)}
            continue
        if cls in ("KLoRASubjectLoader", "KLoRAStyleLoader"):
            inputs.pop("clip", None)  # no text encoder: the loaders' CLIP input is optional
            inputs["lora_name"] = files["subject" if cls == "KLoRASubjectLoader" else "style"]
        elif cls == "UNETLoader":
            inputs["unet_name"] = files["unet"]
            if not files["detected"]:
                node["class_type"] = "KLoRATestDiffusionModel"
                node["inputs"] = {"unet_name": files["unet"]}
        elif cls == "VAELoader":
            inputs["vae_name"] = files["vae"]
        for key, value in {"width": SMALL_PIXELS, "height": SMALL_PIXELS, "steps": SMALL_STEPS,
                           "length": SMALL_FRAMES}.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = value
    return out


def link_test_nodes(server) -> None:
    """Install the test-only nodes (tests/support/comfy_test_nodes) into a not yet started server."""
    from klora_core.cli.comfy.server import link_or_copy

    link_or_copy(TEST_NODES, Path(server.workdir) / "custom_nodes" / "klora-test-nodes")
