"""Model files for server tests: what ComfyUI's stock loaders detect, plus deliberately bad LoRAs.

The generators live in the product module :mod:`klora_core.cli.demo_models`
(torch + safetensors only; ``python -m klora_core run`` uses them too); this
module puts their files into a server's model folders and adds the broken
files the error tests need.

    write_all(server, seed)  -> {"unet": name, "clip": name, "vae": name, "subject": name, "style": name}

- UNet (``UNETLoader``, detected as SD15), 36 MiB: generated from ``seed``
  straight into ``server.unet_dir`` (under a second).
- Text encoder (``CLIPLoader``, type ``stable_diffusion``): CLIP-L, whose
  size ComfyUI fixes (123 M parameters, 235 MiB float16); generated once into
  :func:`klora_core.cli.demo_models.default_cache_dir` (outside the repository;
  about 3 s) and symlinked into ``server.clip_dir``.
- VAE (``VAELoader``): TAESD layout, 4.7 MiB, into ``server.vae_dir``.
- Subject/style LoRAs (kohya SD1.5 names, ranks 8 and 4) into ``server.loras_dir``.

Bad files (``write_*``): a corrupt ``.safetensors``, a pickle whose payload
would create a file when unpickled, and LoRAs made for other model families.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from klora_core.cli import demo_models  # noqa: E402
from klora_core.cli.demo_models import DEFAULT_SEED  # noqa: E402


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def write_unet(folder, seed: int = DEFAULT_SEED) -> str:
    """Generate the SD15-detectable demo UNet into ``folder``; returns its file name."""
    return demo_models.ensure_file("unet", folder, seed).name


def write_text_encoder(folder, seed: int = DEFAULT_SEED) -> str:
    """Link the cached CLIP-L (generated on first use) into ``folder``; returns its file name."""
    cached = demo_models.ensure_file("clip", demo_models.default_cache_dir(), seed)
    _link(cached, Path(folder) / cached.name)
    return cached.name


def write_vae(folder, seed: int = DEFAULT_SEED) -> str:
    return demo_models.ensure_file("vae", folder, seed).name


def write_demo_loras(folder, seed: int = DEFAULT_SEED) -> tuple:
    """``(subject_name, style_name)`` written into ``folder``."""
    return (demo_models.ensure_file("subject", folder, seed).name,
            demo_models.ensure_file("style", folder, seed).name)


def write_all(server, seed: int = DEFAULT_SEED) -> dict:
    """Every demo file into the server's model folders; returns the ComfyUI file names."""
    subject, style = write_demo_loras(server.loras_dir, seed)
    return {"unet": write_unet(server.unet_dir, seed), "clip": write_text_encoder(server.clip_dir, seed),
            "vae": write_vae(server.vae_dir, seed), "subject": subject, "style": style}


# --------------------------------------------------------------------------- bad files

def write_corrupt_safetensors(path) -> Path:
    """A ``.safetensors`` whose header claims more data than the file holds (a truncated download)."""
    path = Path(path)
    header = b'{"lora_unet_x.lora_down.weight":{"dtype":"F16","shape":[4,320],"data_offsets":[0,2560]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 100)
    return path


class _CreateFileOnUnpickle:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker) -> bytes:
    """Pickle bytes that create ``marker`` when loaded by an unsafe unpickler."""
    return pickle.dumps({"lora_unet_x.lora_down.weight": _CreateFileOnUnpickle(marker)}, protocol=2)


def write_pickle_bomb(path, marker) -> Path:
    """A ``.pt`` file whose unpickling would create ``marker`` (it must never exist afterwards)."""
    path = Path(path)
    path.write_bytes(pickle_payload(marker))
    return path


def write_flux_lora(path, rank: int = 4) -> Path:
    """A kohya FLUX LoRA (``lora_unet_double_blocks_0_img_attn_qkv``): no key fits an SD1.5 UNet."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(11)
    sd = {}
    for name, out_f, in_f in (("double_blocks_0_img_attn_qkv", 3 * 3072, 3072),
                              ("double_blocks_0_img_attn_proj", 3072, 3072)):
        key = f"lora_unet_{name}"
        sd[key + ".lora_down.weight"] = torch.randn(rank, in_f, generator=gen).to(torch.float16)
        sd[key + ".lora_up.weight"] = torch.randn(out_f, rank, generator=gen).to(torch.float16)
        sd[key + ".alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    save_file(sd, str(path))
    return Path(path)


def write_sd2_shaped_lora(path, rank: int = 4) -> Path:
    """SD1.5 key names but SD2 shapes (cross-attention reads 1024-wide text): names match, shapes do not."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(12)
    sd = {}
    for kohya, _key, out_f, in_f in demo_models.attention_targets():
        in_f = 1024 if in_f == demo_models.CONTEXT_DIM else in_f
        sd[kohya + ".lora_down.weight"] = torch.randn(rank, in_f, generator=gen).to(torch.float16)
        sd[kohya + ".lora_up.weight"] = torch.randn(out_f, rank, generator=gen).to(torch.float16)
    save_file(sd, str(path))
    return Path(path)
