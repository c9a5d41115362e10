# SPDX-License-Identifier: GPL-3.0-or-later
"""The GPU cost model of docs/modes.md: FLOPs, memory traffic and memory per image for each mode.

    python bench/cost_model.py            # prints the markdown tables docs/modes.md quotes

Pure arithmetic (no torch, no ComfyUI): the shapes of the switched weights
(every attention projection, K-LoRA's default scope) of SD1.5, SDXL and
FLUX.1-dev, the tokens each sees per model evaluation, and per mode:

- bypass: per evaluation and switched weight ``2 T r (m + n)`` FLOPs;
  ``(r (m + n) + T n + 2 T r + 2 T m) b`` bytes (read the factors, read x again,
  write and read the rank-r hidden, read and write the output in place);
- live: per evaluation and weight ``2 m n r`` FLOPs and about ``LIVE_BYTES``
  bytes per weight element (ComfyUI's float32 patch path: copy, delta,
  scale, add, cast back);
- bake: per re-bake of a weight ``2 m n r`` FLOPs, ``m n b`` bytes over PCIe
  (the original comes back from RAM) and about ``BAKE_BYTES`` bytes per
  element on the GPU; ``FLIPS`` re-bakes per weight and image (measured on the
  CPU benchmark: about one flip plus the restore after sampling);
- merge: nothing per evaluation (both LoRAs baked once at load).

``m`` out features, ``n`` in features, ``r`` rank of the applied LoRA, ``T``
tokens of the evaluation (batch included), ``b`` bytes per element (2:
float16/bfloat16).  Times are roofline lower bounds, max(FLOPs / peak,
bytes / bandwidth), never measurements.
"""
from __future__ import annotations

B = 2            # bytes per element, float16 / bfloat16
LIVE_BYTES = 44  # per weight element and evaluation in ComfyUI's float32 patch path
BAKE_BYTES = 30  # per weight element and re-bake on the GPU (float32 work copy, delta, rounding back)
FLIPS = 2        # re-bakes per weight per image (a flip and the restore; the CPU benchmark measures ~1.9)
RANKS = (8, 64, 128)

#: name: (peak dense bf16 FLOP/s, memory bandwidth B/s, host-to-device B/s)
GPUS = {"H100 SXM": (989e12, 3.35e12, 55e9), "RTX 4090": (165e12, 1.01e12, 25e9)}


def sd15():
    """SD1.5 at 512x512, cfg 7 (batch 2), 20 steps: ``[(m, n, T)]`` per switched weight."""
    layers = []
    for c, tokens, blocks in ((320, 4096, 5), (640, 1024, 5), (1280, 256, 5), (1280, 64, 1)):
        t = 2 * tokens
        for _ in range(blocks):
            layers += [(c, c, t)] * 4 + [(c, c, t), (c, 768, 2 * 77), (c, 768, 2 * 77), (c, c, t)]
    return {"name": "SD1.5 512x512, 20 steps, cfg 7", "evals": 20, "layers": layers, "params": 0.86e9}


def sdxl():
    """SDXL at 1024x1024, cfg 7 (batch 2), 30 steps."""
    layers = []
    for c, tokens, blocks in ((640, 4096, 10), (1280, 1024, 60)):
        t = 2 * tokens
        for _ in range(blocks):
            layers += [(c, c, t)] * 4 + [(c, c, t), (c, 2048, 2 * 77), (c, 2048, 2 * 77), (c, c, t)]
    return {"name": "SDXL 1024x1024, 30 steps, cfg 7", "evals": 30, "layers": layers, "params": 2.57e9}


def flux():
    """FLUX.1-dev at 1024x1024 (4096 image + 512 text tokens), 28 steps, guidance-distilled (cfg 1)."""
    h, img, txt = 3072, 4096, 512
    layers = []
    for _ in range(19):
        for t in (img, txt):
            layers += [(3 * h, h, t), (h, h, t)]            # qkv, proj of each stream
    for _ in range(38):
        layers += [(3 * h + 4 * h, h, img + txt), (h, h + 4 * h, img + txt)]  # linear1, linear2
    return {"name": "FLUX.1-dev 1024x1024, 28 steps", "evals": 28, "layers": layers, "params": 11.9e9}


def costs(model: dict, r: int) -> dict:
    """Per image: FLOPs and bytes of each mode's extra work, and memory."""
    e, layers = model["evals"], model["layers"]
    base = sum(2 * t * m * n for m, n, t in layers) * e
    weights = sum(m * n for m, n, _ in layers)
    return {
        "switched_params": weights,
        "base_flops": base,
        "bypass_flops": sum(2 * t * r * (m + n) for m, n, t in layers) * e,
        "bypass_bytes": sum((r * (m + n) + t * n + 2 * t * r + 2 * t * m) * B for m, n, t in layers) * e,
        "bypass_gpu_memory": sum(2 * r * (m + n) * B for m, n, _ in layers),  # both LoRAs of the pair
        "live_flops": 2 * weights * r * e,
        "live_bytes": weights * LIVE_BYTES * e,
        "bake_flops": 2 * weights * r * FLIPS,
        "bake_pcie_bytes": weights * B * FLIPS,
        "bake_bytes": weights * BAKE_BYTES * FLIPS,
        "backup_ram": weights * B,          # merge and bake: originals of the patched weights stay in RAM
        "delegate_ram": model["params"] * B,  # bake on dynamic VRAM: ComfyUI's second copy of the model
    }


def seconds(flops: float, nbytes: float, gpu: str, pcie: float = 0.0) -> float:
    peak, bandwidth, host = GPUS[gpu]
    return max(flops / peak, nbytes / bandwidth) + pcie / host


def _g(x: float) -> str:
    return f"{x / 1e12:.2f} T" if x >= 1e12 else f"{x / 1e9:.1f} G"


def table() -> str:
    lines = []
    for model in (sd15(), sdxl(), flux()):
        c0 = costs(model, RANKS[0])
        lines += [
            f"**{model['name']}**: {len(model['layers'])} switched weights, "
            f"{c0['switched_params'] / 1e9:.2f} G parameters; their base work {_g(c0['base_flops'])}FLOP per image. "
            f"RAM held by merge/bake for the originals: {c0['backup_ram'] / 2**30:.1f} GiB; by the non-dynamic "
            f"delegate (bake on dynamic VRAM): {c0['delegate_ram'] / 2**30:.1f} GiB.",
            "",
            "| rank | bypass: extra FLOP / image | bypass: traffic / image | bypass: GPU memory (pair) | "
            "live: extra FLOP / traffic | bake: FLOP / GPU traffic / PCIe (2 re-bakes per weight) | "
            + " | ".join(f"{g}: bypass / live / bake, s per image (lower bound)" for g in GPUS) + " |",
            "|---" * (6 + len(GPUS)) + "|",
        ]
        for r in RANKS:
            c = costs(model, r)
            times = []
            for gpu in GPUS:
                times.append(" / ".join(f"{t:.2f}" for t in (
                    seconds(c["bypass_flops"], c["bypass_bytes"], gpu),
                    seconds(c["live_flops"], c["live_bytes"], gpu),
                    seconds(c["bake_flops"], c["bake_bytes"], gpu, c["bake_pcie_bytes"]))))
            lines.append(
                f"| {r} | {_g(c['bypass_flops'])} ({100 * c['bypass_flops'] / c['base_flops']:.1f}% of base) | "
                f"{c['bypass_bytes'] / 1e9:.0f} GB | {c['bypass_gpu_memory'] / 2**20:.0f} MiB | "
                f"{_g(c['live_flops'])} / {c['live_bytes'] / 1e9:.0f} GB | "
                f"{_g(c['bake_flops'])} / {c['bake_bytes'] / 1e9:.0f} GB / {c['bake_pcie_bytes'] / 1e9:.1f} GB | "
                + " | ".join(times) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(), end="")
