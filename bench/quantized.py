# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark worker (e): K-LoRA Fuse vs two LoraLoaders (direct merge) on quantized models.

    python bench/quantized.py --json OUT.json [--quick]

The model of part (a) (common.SD15_CLASS, 420 M parameters; --quick: the
SD1.5-detectable demo UNet, 18.7 M) is written to files as users get them and
loaded by the loaders users use:

- ``fp8_e4m3fn``: a float16 ``.safetensors`` through ComfyUI's UNETLoader with
  ``weight_dtype`` fp8_e4m3fn (weights stored in fp8, computed in float32 on
  CPU); patches are baked with ComfyUI's seeded stochastic rounding, K-LoRA
  re-bakes a weight when its choice flips;
- ``Q8_0``: a GGUF file (2-D weights Q8_0, the rest F16, tests/support/
  quantized_files.py) through ComfyUI-GGUF's UnetLoaderGGUF (the real pack,
  unpacked from the shared source tarball; skipped with the reason when it or
  the ``gguf`` package is missing).  ComfyUI-GGUF dequantizes and patches every
  weight at every forward, for the merge and for K-LoRA alike: K-LoRA runs live
  there and re-bakes nothing.

Per format, K-LoRA and the merge of the same two LoRA files run in alternating
rounds (one full ``comfy.sample.sample`` each, inside ``torch.inference_mode``
as ComfyUI's executor runs nodes); medians over the rounds.  Nothing here
assumes the CPU: the devices are ComfyUI's (the benchmark's start-up pins the
CPU today).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sampling  # noqa: E402  (timed_sample)

FORMATS = ("fp8_e4m3fn", "Q8_0")
METHODS = ("klora", "merge")


def write_files(s: dict, folder: Path, quick: bool) -> tuple:
    """``(files, LoRA paths)``: the model as fp16 safetensors and GGUF Q8_0 (when possible), a rank-r LoRA pair."""
    import torch
    from support import gguf_pack, quantized_files

    if quick:
        if str(common.REPO_ROOT) not in sys.path:
            sys.path.append(str(common.REPO_ROOT))  # appended: the pack's nodes/ must not shadow ComfyUI's nodes.py
        from klora_core.cli import demo_models

        sd = demo_models.make_unet_state_dict(demo_models.DEFAULT_SEED)
        base = None
    else:
        base = common.build_model(s["model"])
        sd = {k: v.to(torch.float16) for k, v in base.model.diffusion_model.state_dict().items()}
    files = {"fp8_e4m3fn": "model-fp16.safetensors"}
    from safetensors.torch import save_file

    save_file(sd, str(folder / files["fp8_e4m3fn"]))
    reason = gguf_pack.unavailable_reason()
    if reason is None:
        files["Q8_0"] = "model-Q8_0.gguf"
        t0 = time.perf_counter()
        quantized_files.write_gguf(sd, folder / files["Q8_0"], "Q8_0", rest="F16")
        common.log(f"GGUF Q8_0 written in {time.perf_counter() - t0:.1f} s")
    else:
        files["Q8_0"] = f"skipped ({reason})"
    if base is None:
        import comfy.sd

        base = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    rank = s["ranks"][-1]
    loras = common.make_pair_files(base, rank, folder)
    return files, loras, rank


def load(fmt: str, name: str):
    import nodes
    from support import gguf_pack

    if fmt == "Q8_0":
        return gguf_pack.load_in_process()["UnetLoaderGGUF"]().load_unet(name)[0]
    return nodes.UNETLoader().load_unet(name, fmt)[0]


def bench_format(fmt: str, name: str, loras, s: dict, conds, fuse_mod, files_mod) -> dict:
    import comfy.sd
    import torch

    base = load(fmt, name)
    subject = files_mod.make_handle("subject", loras[0].name, str(loras[0]), 1.0)
    style = files_mod.make_handle("style", loras[1].name, str(loras[1]), 1.0)
    t0 = time.perf_counter()
    fused = fuse_mod.fuse_model(base, subject, style)
    fuse_s = time.perf_counter() - t0
    merged, _ = comfy.sd.load_lora_for_models(base, None, subject.state_dict, 1.0, 0)
    merged, _ = comfy.sd.load_lora_for_models(merged, None, style.state_dict, 1.0, 0)
    patchers = {"klora": fused.model, "merge": merged}
    run = fused.run
    times, cpu_times, step_times = ({m: [] for m in METHODS} for _ in range(3))
    rebaked = []
    with torch.inference_mode():
        for method in METHODS:  # warm-up: first-call overheads
            common.sample(patchers[method], dict(s, steps=1), conds)
        for rnd in range(s["repeats"]):
            for method in (METHODS if rnd % 2 == 0 else METHODS[::-1]):
                before = run.rebaked
                out, wall, cpu, steps, _ = sampling.timed_sample(patchers[method], s, conds)
                assert torch.isfinite(out).all(), f"{fmt} {method}: non-finite latents"
                times[method].append(wall)
                cpu_times[method].append(cpu)
                step_times[method].append(steps)
                if method == "klora":
                    rebaked.append(run.rebaked - before)
                common.log(f"{fmt} round {rnd + 1}/{s['repeats']} {method}: {wall:.2f} s ({cpu:.2f} s CPU)")
    med = {m: common.median(times[m]) for m in METHODS}
    med_cpu = {m: common.median(cpu_times[m]) for m in METHODS}
    steady = {m: common.median([t for run_steps in step_times[m] for t in run_steps[1:]]) for m in METHODS}
    mode = next((line for line in fused.report.splitlines() if line.startswith("mode ")), "")
    return {
        "file": name, "switched_weights": len(fused.plan.keys), "fuse_seconds": fuse_s, "mode": mode,
        "host_live_weights": len(run.host_live), "rebaked_per_image": rebaked,
        "times": times, "cpu_times": cpu_times, "median": med, "median_cpu": med_cpu,
        "median_step_1_to_end": steady,
        "ratio_klora_merge": med["klora"] / med["merge"],
        "ratio_klora_merge_cpu": med_cpu["klora"] / med_cpu["merge"],
        "ratio_step_klora_merge": steady["klora"] / steady["merge"],
    }


def main() -> int:
    args = common.worker_args()
    s, comfy_env = common.start_worker(args.quick)
    import comfy.model_management
    import folder_paths

    fuse_mod, files_mod = (comfy_env.import_pack_module(name) for name in ("nodes.fuse", "nodes.handles"))
    model_config = common.SD15_CLASS if not args.quick else "demo UNet (klora_core/cli/demo_models.py)"
    result = {"settings": {k: v for k, v in s.items() if k != "model"}, "model": model_config, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
        files, loras, rank = write_files(s, folder, args.quick)
        result["rank"] = rank
        conds = common.conds_and_latent(common.SD15_CLASS, s["latent"])
        for fmt in FORMATS:
            if files[fmt].startswith("skipped"):
                result["formats"][fmt] = files[fmt]
                common.log(f"{fmt}: {files[fmt]}")
                continue
            result["formats"][fmt] = bench_format(fmt, files[fmt], loras, s, conds, fuse_mod, files_mod)
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
