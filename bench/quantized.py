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
  the ``gguf`` package is missing).  ComfyUI-GGUF dequantizes every weight at
  every forward and adds its patch list as dense deltas.  K-LoRA runs twice
  there: ``klora`` in the automatic mode (bypass on GGUF: the weights keep an
  empty patch list and the chosen LoRA's low-rank term is added at forward) and
  ``klora_live`` in mode live (the switches in the patch list, patched as dense
  deltas by ComfyUI-GGUF at every forward: what the automatic mode did before).

Per format, the K-LoRA runs and the merge of the same two LoRA files run in alternating
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
#: Further K-LoRA runs per format: {method: mode input}.  ``klora`` itself runs the automatic mode.
EXTRA_MODES = {"Q8_0": {"klora_live": "live"}}


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
    modes = {"klora": "auto", **EXTRA_MODES.get(fmt, {})}
    t0 = time.perf_counter()
    fused = {m: fuse_mod.fuse_model(base, subject, style, mode=mode) for m, mode in modes.items()}
    fuse_s = (time.perf_counter() - t0) / len(fused)
    merged, _ = comfy.sd.load_lora_for_models(base, None, subject.state_dict, 1.0, 0)
    merged, _ = comfy.sd.load_lora_for_models(merged, None, style.state_dict, 1.0, 0)
    patchers = {**{m: f.model for m, f in fused.items()}, "merge": merged}
    methods = tuple(patchers)
    times, cpu_times, step_times = ({m: [] for m in methods} for _ in range(3))
    rebaked = {m: [] for m in fused}
    with torch.inference_mode():
        for method in methods:  # warm-up: first-call overheads
            common.sample(patchers[method], dict(s, steps=1), conds)
        for rnd in range(s["repeats"]):
            for method in (methods if rnd % 2 == 0 else methods[::-1]):
                before = fused[method].run.rebaked if method in fused else 0
                out, wall, cpu, steps, _ = sampling.timed_sample(patchers[method], s, conds)
                assert torch.isfinite(out).all(), f"{fmt} {method}: non-finite latents"
                times[method].append(wall)
                cpu_times[method].append(cpu)
                step_times[method].append(steps)
                if method in fused:
                    rebaked[method].append(fused[method].run.rebaked - before)
                common.log(f"{fmt} round {rnd + 1}/{s['repeats']} {method}: {wall:.2f} s ({cpu:.2f} s CPU)")
    med = {m: common.median(times[m]) for m in methods}
    med_cpu = {m: common.median(cpu_times[m]) for m in methods}
    steady = {m: common.median([t for run_steps in step_times[m] for t in run_steps[1:]]) for m in methods}
    result = {"file": name, "switched_weights": len(fused["klora"].plan.keys), "fuse_seconds": fuse_s,
              "times": times, "cpu_times": cpu_times, "median": med, "median_cpu": med_cpu,
              "median_step_1_to_end": steady}
    for m, f in fused.items():  # "mode" / "ratio_klora_merge" ...: the automatic mode; "<key>_klora_live" ...
        tag = "" if m == "klora" else "_" + m
        result["mode" + tag] = next((line for line in f.report.splitlines() if line.startswith("mode ")), "")
        result["host_live_weights" + tag] = len(f.run.host_live)
        result["rebaked_per_image" + tag] = rebaked[m]
        result[f"ratio_{m}_merge"] = med[m] / med["merge"]
        result[f"ratio_{m}_merge_cpu"] = med_cpu[m] / med_cpu["merge"]
        result[f"ratio_step_{m}_merge"] = steady[m] / steady["merge"]
    return result


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
