# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark of K-LoRA's modes: bake, bypass and a direct merge side by side, per LoRA rank.

    bash bench/run.sh --modes [--quick]              CPU (the cached test environment)
    bash bench/run_gpu.sh [--quick]                  NVIDIA GPU (your ComfyUI's CUDA python)
    python bench/modes.py [--device cpu|cuda] [--quick] [--ranks 8,64,128] [--live] [--out-dir DIR] [--date D]

Driver: one timing worker (all methods, interleaved rounds, one process),
then one memory worker per method and rank (own process each, so peaks do
not mix); writes ``<out-dir>/<date>-modes-<device>[-quick].{json,md}`` and
prints the markdown table last.

- time: seconds per image and per step (steps 1..N-1; step 0 also holds
  ComfyUI's patching), medians over interleaved rounds; on the CPU the
  process's CPU time (single-threaded torch; other jobs share the cores), on
  CUDA wall time with the device synchronised at every step;
- memory: peak resident memory of the process growing while the LoRAs are
  read, the model patched and one image sampled (CPU: RSS polled every 2 ms;
  CUDA: ``torch.cuda.max_memory_allocated``);
- agreement: relative difference of each K-LoRA mode's latent to bake's.

Methods: ``bake`` and ``bypass`` (K-LoRA Fuse with that mode), ``merge``
(both LoRAs added by ComfyUI's ``load_lora_for_models``, the usual
LoraLoader stack), and with ``--live`` the live fallback.  The cost model
behind the numbers: docs/modes.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: Full-size SD1.5 UNet (860 M parameters) for GPUs: real widths, depth and heads (ComfyUI's SD15
#: detection config; transformer depths are per input / output block, not per level).
SD15_FULL = {
    **common.SD15_CLASS,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
SETTINGS = {
    ("cpu", False): {**common.FULL, "ranks": [8, 64, 128], "repeats": 3},
    ("cpu", True): {**common.QUICK, "ranks": [4], "repeats": 2},
    ("cuda", False): {"model": SD15_FULL, "latent": 64, "steps": 20, "cfg": 7.0, "sampler": "euler",
                      "scheduler": "normal", "ranks": [8, 64, 128], "repeats": 5, "dtype": "float16"},
    ("cuda", True): {"model": SD15_FULL, "latent": 32, "steps": 4, "cfg": 7.0, "sampler": "euler",
                     "scheduler": "normal", "ranks": [8], "repeats": 2, "dtype": "float16"},
}
GOAL_MEMORY = 1.05  # bypass peak / merge peak


def lora_scale(rank: int) -> float:
    """Up-factor multiplier giving deltas about a tenth of the weights' size, as trained LoRAs have.

    The default factory LoRAs are several times larger than these fan-in-scaled
    random weights; attention then saturates and float32 rounding (of bake as of
    bypass) is amplified through the layers, which says nothing about the modes.
    """
    return 0.3 / rank ** 0.5


def settings(device: str, quick: bool, ranks=None) -> dict:
    s = dict(SETTINGS[(device, quick)])
    if ranks:
        s["ranks"] = ranks
    return s


# ------------------------------------------------------------------ workers
def _start(device: str, quick: bool, ranks):
    import torch

    s = settings(device, quick, ranks)
    common.single_thread()
    torch.set_flush_denormal(True)
    _, comfy_env = common.setup_comfy(cpu=device == "cpu")
    dtype = getattr(torch, s.get("dtype", "float32"))
    base = common.build_model(s["model"], dtype=dtype, load_device=torch.device(device))
    return s, comfy_env, base


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def make_patcher(method, base, files, comfy_env):
    """The patched model of ``method``: K-LoRA Fuse (bake / bypass / live) or the two-LoRA merge."""
    import comfy.sd

    subject_path, style_path = files
    handles = comfy_env.import_pack_module("nodes.handles")
    subject = handles.make_handle("subject", subject_path.name, str(subject_path), 1.0)
    style = handles.make_handle("style", style_path.name, str(style_path), 1.0)
    if method == "merge":
        merged, _ = comfy.sd.load_lora_for_models(base, None, subject.state_dict, 1.0, 0)
        return comfy.sd.load_lora_for_models(merged, None, style.state_dict, 1.0, 0)[0], None
    fused = comfy_env.import_pack_module("nodes.fuse").fuse_model(base, subject, style, mode=method)
    assert fused.run.mode == method, fused.report
    return fused.model, fused


def _clock(device: str) -> float:
    """CUDA: wall time after synchronising.  CPU: this process's CPU time (other jobs share the cores)."""
    if device == "cuda":
        _sync(device)
        return time.perf_counter()
    return time.process_time()


def timed_sample(patcher, s, conds, device):
    """``(latent, seconds, [seconds per step])`` of one ``comfy.sample.sample`` call (see _clock)."""
    stamps = []

    def callback(step, x0, x, total):
        stamps.append(_clock(device))

    t0 = _clock(device)
    out = common.sample(patcher, s, conds, callback=callback)
    t1 = _clock(device)
    return out.float().cpu(), t1 - t0, [b - a for a, b in zip([t0] + stamps[:-1], stamps)]


def time_worker(args) -> dict:
    s, comfy_env, base = _start(args.device, args.quick, args.ranks)
    import comfy.model_management
    import torch

    methods = ["bake", "bypass", "merge"] + (["live"] if args.live else [])
    conds = common.conds_and_latent(s["model"], s["latent"])
    result = {"settings": {k: v for k, v in s.items() if k != "model"}, "model_config": s["model"],
              "model_params": common.count_params(base), "methods": methods, "ranks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in s["ranks"]:
            files = common.make_pair_files(base, rank, Path(tmp), scale=lora_scale(rank))
            patchers = {m: make_patcher(m, base, files, comfy_env)[0] for m in methods}
            for m in methods:  # warm-up: first-call overheads, one step
                common.sample(patchers[m], dict(s, steps=1), conds)
            times, steps, outs = {m: [] for m in methods}, {m: [] for m in methods}, {}
            for rnd in range(s["repeats"]):
                for m in methods[rnd % len(methods):] + methods[:rnd % len(methods)]:
                    outs[m], seconds, per_step = timed_sample(patchers[m], s, conds, args.device)
                    times[m].append(seconds)
                    steps[m].append(per_step)
                    common.log(f"rank {rank} round {rnd + 1}/{s['repeats']} {m}: {seconds:.3f} s")
            med = {m: common.median(times[m]) for m in methods}
            step = {m: common.median([t for run in steps[m] for t in run[1:]]) for m in methods}
            result["ranks"][str(rank)] = {
                "times": times, "median_image_s": med, "median_step_s": step,
                "image_vs_merge": {m: med[m] / med["merge"] for m in methods},
                "step_vs_merge": {m: step[m] / step["merge"] for m in methods},
                "relative_to_bake": {m: float((outs[m] - outs["bake"]).norm() / outs["bake"].norm())
                                     for m in methods},
            }
            assert all(torch.isfinite(o).all() for o in outs.values())
            del patchers
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
    return result


def memory_worker(args) -> dict:
    import torch

    s, comfy_env, base = _start(args.device, args.quick, [args.rank])
    conds = common.conds_and_latent(s["model"], s["latent"])
    cuda = args.device == "cuda"
    for module in ("nodes.fuse", "nodes.handles"):  # imports are not what is measured
        comfy_env.import_pack_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        files = common.make_pair_files(base, args.rank, Path(tmp), scale=lora_scale(args.rank))
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = common.sample(make_patcher(args.method, base, files, comfy_env)[0], s, conds)
            peak = torch.cuda.max_memory_allocated()
        else:
            from memory import RssPoller  # bench/memory.py

            with RssPoller() as poller:
                before = poller.peak
                out = common.sample(make_patcher(args.method, base, files, comfy_env)[0], s, conds)
            peak = poller.peak
    assert torch.isfinite(out).all()
    mib = 1024 * 1024
    return {"method": args.method, "rank": args.rank, "device": args.device,
            "measure": "torch.cuda.max_memory_allocated" if cuda else "process RSS",
            "before_mib": before / mib, "peak_mib": peak / mib, "growth_mib": (peak - before) / mib,
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ driver
def make_table(res: dict) -> str:
    from bench import fmt  # bench/bench.py

    t = res["time"]
    cfg, m = t["settings"], res["machine"]
    unit = "GPU MiB (max allocated)" if res["device"] == "cuda" else "RSS MiB"
    lines = [
        f"K-LoRA modes, {'QUICK smoke run, ' if res['quick'] else ''}{res['date']}, {res['device']}: "
        f"{m.get('gpu') if res['device'] == 'cuda' else m['cpu']}, torch {m.get('torch')}. SD1.5-class UNet "
        f"{t['model_params'] / 1e6:.0f} M parameters ({cfg.get('dtype', 'float32')}), {cfg['latent']}x{cfg['latent']} "
        f"latent, {cfg['steps']} steps {cfg['sampler']}, cfg {cfg['cfg']}; kohya LoRAs on every attention "
        f"projection (deltas about a tenth of the weights); medians of {cfg['repeats']} interleaved rounds of "
        f"{'wall time (device synchronised)' if res['device'] == 'cuda' else 'CPU time, one thread'}. Memory: growth of peak "
        f"{unit} while reading the LoRAs, patching and sampling one image, one process per cell.",
        "",
        "| rank | mode | s / image | vs merge | s / step (1..N-1) | vs merge | peak growth | vs merge | "
        "rel. diff to bake |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, r in t["ranks"].items():
        mem = res["memory"].get(rank, {})
        merge_mem = mem.get("merge", {}).get("growth_mib")
        for method in t["methods"]:
            growth = mem.get(method, {}).get("growth_mib")
            mem_ratio = growth / merge_mem if growth is not None and merge_mem else None
            lines.append(
                f"| {rank} | {method} | {fmt(r['median_image_s'][method])} | "
                f"{r['image_vs_merge'][method]:.3f} | {fmt(r['median_step_s'][method])} | "
                f"{r['step_vs_merge'][method]:.3f} | {fmt(growth)} | {fmt(mem_ratio)} | "
                f"{r['relative_to_bake'][method]:.1e} |")
    lines.append("")
    goal = f"Goal: bypass peak growth <= {GOAL_MEMORY} x merge: "
    if res["quick"]:
        goal += "for the full run (the smoke run's model is too small to measure memory)"
    else:
        goal += ", ".join(f"rank {rank} {'met' if ok else 'MISSED'}" for rank, ok in res["memory_goal"].items())
    lines.append(goal)
    return "\n".join(lines) + "\n"


def drive(args) -> int:
    from bench import run_worker  # bench/bench.py

    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{date}-modes-{args.device}" + ("-quick" if args.quick else "")
    common_args = ["--device", args.device] + (["--quick"] if args.quick else [])
    if args.ranks:
        common_args += ["--ranks", ",".join(map(str, args.ranks))]
    res = {"date": date, "quick": args.quick, "device": args.device, "machine": common.machine(),
           "command": "python bench/modes.py " + " ".join(sys.argv[1:])}
    timeout = 600 if args.quick else 7200
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res["time"] = run_worker("modes.py", ["--worker", "time"] + common_args + (["--live"] if args.live else []),
                                 tmp / "time.json", timeout)
        res["memory"] = {}
        for rank in res["time"]["ranks"]:
            for method in ("bake", "bypass", "merge"):
                cell = run_worker("modes.py", ["--worker", "memory", "--method", method, "--rank", rank] + common_args,
                                  tmp / f"mem-{method}-{rank}.json", timeout)
                res["memory"].setdefault(rank, {})[method] = cell
    res["memory_goal"] = {rank: cells["bypass"]["growth_mib"] <= GOAL_MEMORY * max(cells["merge"]["growth_mib"], 1e-9)
                          for rank, cells in res["memory"].items()}
    res["table_markdown"] = make_table(res)
    out_dir = Path(args.out_dir)
    common.write_json(out_dir / f"{stem}.json", res)
    (out_dir / f"{stem}.md").write_text(res["table_markdown"])
    common.log(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    print(res["table_markdown"], end="", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: small model, few steps, one rank")
    ap.add_argument("--ranks", type=lambda text: [int(x) for x in text.split(",")], default=None)
    ap.add_argument("--live", action="store_true", help="also time the live fallback")
    ap.add_argument("--out-dir", default=str(common.BENCH_DIR / "results"))
    ap.add_argument("--date", default=None)
    ap.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench/modes.py --device cuda: this python's torch sees no CUDA device")
    if args.worker is None:
        return drive(args)
    data = time_worker(args) if args.worker == "time" else memory_worker(args)
    common.write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
