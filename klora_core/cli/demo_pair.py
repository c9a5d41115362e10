"""A seeded pair of small demo LoRAs (subject + style) for the CLI, docs and tests.

The layout mimics the attention layers of an SD1.5 UNet at a fraction of the
size: seven transformer blocks (one per down/mid/up level), each with a
self-attention (``attn1``) and a cross-attention (``attn2``), four projections
each (``to_q``, ``to_k``, ``to_v``, ``to_out_0``): 56 weights.  Channel widths
are 32/64/128 instead of 320/640/1280 and the text context is 48 wide instead
of 768, so the files are a few hundred KiB and score in milliseconds.

Tensor names follow kohya/sd-scripts: ``lora_unet_<module>.lora_down.weight``
``[rank, in]``, ``.lora_up.weight`` ``[out, rank]`` and ``.alpha`` (scalar).
The subject LoRA has rank 8 and alpha 4, the style LoRA rank 4 and alpha 4,
so both the alpha/rank scale and K = rank_S * rank_T matter.  The subject's
per-weight magnitude varies log-uniformly (seeded) and the style's deltas are
made more or less peaked per weight, so the K-LoRA choice of most weights
flips from subject to style at different steps of the ``s`` schedule.
"""
from __future__ import annotations

import math
import os
from typing import Union

#: (block name, channels) of the demo UNet's transformer blocks, in model order.
DEMO_BLOCKS = (
    ("down_blocks_0_attentions_0", 32),
    ("down_blocks_1_attentions_0", 64),
    ("down_blocks_2_attentions_0", 128),
    ("mid_block_attentions_0", 128),
    ("up_blocks_1_attentions_0", 128),
    ("up_blocks_2_attentions_0", 64),
    ("up_blocks_3_attentions_0", 32),
)
#: Width of the (pretend) text-encoder context that cross-attention keys/values read.
DEMO_CONTEXT_DIM = 48
SUBJECT_RANK, SUBJECT_ALPHA = 8, 4.0
STYLE_RANK, STYLE_ALPHA = 4, 4.0
DEFAULT_SEED = 2025
SUBJECT_FILE = "demo_subject.safetensors"
STYLE_FILE = "demo_style.safetensors"


def demo_layers() -> list:
    """``[(module_name, out_features, in_features)]`` of the demo layout, in model order."""
    layers = []
    for block, ch in DEMO_BLOCKS:
        base = f"{block}_transformer_blocks_0"
        for attn, ctx in (("attn1", ch), ("attn2", DEMO_CONTEXT_DIM)):
            layers.append((f"{base}_{attn}_to_q", ch, ch))
            layers.append((f"{base}_{attn}_to_k", ch, ctx))
            layers.append((f"{base}_{attn}_to_v", ch, ctx))
            layers.append((f"{base}_{attn}_to_out_0", ch, ch))
    return layers


def _lora(gen, out_f: int, in_f: int, rank: int, magnitude: float, peak: float):
    """Random factors (up ``[out, rank]``, down ``[rank, in]``); ``peak`` > 0 adds a few large entries."""
    import torch

    down = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
    up = torch.randn(out_f, rank, generator=gen) * (magnitude / math.sqrt(rank))
    if peak > 0:
        # A few output rows get a much larger first-rank component: the delta
        # gets a handful of large entries, raising its top-K sum more than its L1.
        rows = torch.randperm(out_f, generator=gen)[: max(1, out_f // 16)]
        up[rows, 0] += peak * magnitude
    return up, down


def make_demo_pair(seed: int = DEFAULT_SEED) -> tuple:
    """``(subject_state_dict, style_state_dict)``: kohya-named float16 tensors, seeded."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    subject, style = {}, {}
    for name, out_f, in_f in demo_layers():
        key = f"lora_unet_{name}"
        s_mag = float(torch.empty(1).uniform_(0.3, 2.0, generator=gen))
        if float(torch.rand(1, generator=gen)) < 0.12:
            s_mag *= 2.5  # a few weights where the subject clearly dominates
        t_peak = float(torch.empty(1).uniform_(0.0, 1.5, generator=gen))
        for sd, rank, alpha, mag, peak in (
            (subject, SUBJECT_RANK, SUBJECT_ALPHA, s_mag, 0.0),
            (style, STYLE_RANK, STYLE_ALPHA, 1.0, t_peak),
        ):
            up, down = _lora(gen, out_f, in_f, rank, mag, peak)
            sd[f"{key}.lora_down.weight"] = down.to(torch.float16).contiguous()
            sd[f"{key}.lora_up.weight"] = up.to(torch.float16).contiguous()
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return subject, style


def save_demo_pair(folder: Union[str, os.PathLike], seed: int = DEFAULT_SEED) -> tuple:
    """Write the demo pair as ``demo_subject.safetensors`` / ``demo_style.safetensors`` in ``folder``.

    Returns the two paths.  The folder is created if needed.
    """
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    subject, style = make_demo_pair(seed)
    paths = []
    for sd, fname, role in ((subject, SUBJECT_FILE, "subject"), (style, STYLE_FILE, "style")):
        path = os.path.join(folder, fname)
        save_file(sd, path, metadata={"klora_demo": role, "klora_demo_seed": str(int(seed)), "ss_network_module": "networks.lora"})
        paths.append(path)
    return tuple(paths)
