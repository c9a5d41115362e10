# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared pieces of the benchmark workers: ComfyUI import, the SD1.5-class model, LoRA pairs, timing.

Imported by bench/sampling.py and bench/memory.py (which import ComfyUI)
and bench/score_sdxl.py (which does not).  Nothing here is part of the node pack.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TESTS_DIR = REPO_ROOT / "tests"

# ---------------------------------------------------------------------------
# model configurations
# ---------------------------------------------------------------------------

#: The full benchmark's SD1.5-class UNet: SD1.5's real widths (320 / 640 / 1280
#: channels, context 768, 8 heads, conv proj_in/out) with the depth cut down to
#: keep single-threaded CPU sampling affordable: channel_mult [1, 2, 4] (SD1.5
#: has a 4th level, [1, 2, 4, 4], which carries no attention), one res block per
#: level (SD1.5: 2), transformer depth 1 everywhere (as SD1.5).  Every attention
#: layer type of SD1.5 is present at its real shape: 10 transformer blocks =
#: 20 attention layers (10 self + 10 cross) = 80 projections; 420 M parameters.
SD15_CLASS = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4],
    "use_spatial_transformer": True,
    "legacy": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "adm_in_channels": None,
    "transformer_depth": [1, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
}

#: --quick: the tests' tiny SD1.5-shaped UNet (model_channels 32, context 768).
SD15_TINY = {
    **SD15_CLASS,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
}

FULL = {
    "model": SD15_CLASS, "latent": 32, "steps": 10, "cfg": 1.0, "sampler": "euler", "scheduler": "normal",
    "ranks": [8, 64], "repeats": 3,
}
QUICK = {
    "model": SD15_TINY, "latent": 8, "steps": 4, "cfg": 1.0, "sampler": "euler", "scheduler": "normal",
    "ranks": [4], "repeats": 3,
}


def settings(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


# ---------------------------------------------------------------------------
# process setup
# ---------------------------------------------------------------------------

def single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def setup_comfy(cpu: bool = True):
    """Import ComfyUI (CPU unless ``cpu=False``) through the tests' helper; return (comfy root, pack module loader)."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from support import comfy_env  # tests/comfy_env.py

    root = comfy_env.setup_comfy(cpu=cpu)
    return root, comfy_env


def worker_args():
    """The command line every worker takes: ``--json OUT.json [--quick]``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args()


def start_worker(quick: bool):
    """What every benchmark process does first: settings, one torch thread, no denormals, ComfyUI (CPU).

    Returns ``(settings, comfy_env)``; comfy.sd and comfy.utils are imported.
    """
    s = settings(quick)
    single_thread()
    import torch

    torch.set_flush_denormal(True)
    _, comfy_env = setup_comfy()
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401

    return s, comfy_env


def build_model(config: dict, seed: int = 0, dtype=None, load_device=None):
    """An SD1.5-class ModelPatcher (float32 on the CPU unless ``dtype`` / ``load_device`` say otherwise),
    weights N(0, 1/fan_in) (seeded), norms 1, biases 0.

    Fan-in scaling keeps activations O(1) through 420 M random parameters
    (no overflow, no denormals), so timings reflect ordinary arithmetic.
    """
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm

    model_config = sm.SD15(dict(config))
    model_config.set_inference_dtype(dtype or torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        params = dict(model.diffusion_model.named_parameters())
        for name in sorted(params):
            p = params[name]
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p[0].numel(), 1) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device or cpu, offload_device=cpu)


def count_params(model_patcher) -> int:
    return sum(p.numel() for p in model_patcher.model.diffusion_model.parameters())


def make_pair_files(model_patcher, rank: int, folder: Path, scale: float = 1.0):
    """Write a seeded subject and style LoRA (kohya names, every attention projection) and return their paths.

    ``scale`` multiplies every up factor (lora_factory.make_lora)."""
    from support import lora_factory  # tests/lora_factory.py

    paths = []
    for role, seed in (("subject", 1000 + rank), ("style", 2000 + rank)):
        sd, _ = lora_factory.make_lora(model_patcher, style="kohya", rank=rank, alpha=float(rank), scope="attn",
                                       seed=seed, scale=scale)
        path = folder / f"{role}_r{rank}.safetensors"
        lora_factory.save_lora(sd, path)
        paths.append(path)
    return paths


def conds_and_latent(config: dict, latent: int, seed: int = 0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    ctx = config["context_dim"]
    positive = [[torch.randn((1, 77, ctx), generator=gen), {}]]
    negative = [[torch.randn((1, 77, ctx), generator=gen), {}]]
    latent_image = torch.zeros((1, 4, latent, latent))
    noise = torch.randn((1, 4, latent, latent), generator=gen)
    return positive, negative, latent_image, noise


def sample(model_patcher, s: dict, conds, callback=None):
    import comfy.sample

    positive, negative, latent_image, noise = conds
    return comfy.sample.sample(model_patcher, noise, s["steps"], s["cfg"], s["sampler"], s["scheduler"], positive,
                               negative, latent_image, disable_pbar=True, seed=0, callback=callback)


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

def median(values):
    return statistics.median(values) if values else None


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
