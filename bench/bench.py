# SPDX-License-Identifier: GPL-3.0-or-later
"""K-LoRA benchmark driver: runs the workers, writes JSON + markdown, prints the table last.

    bash bench/run.sh [--quick] [--out-dir DIR]      (the one documented command)
    python bench/bench.py [--quick] [--out-dir DIR]  (same, with a Python that has ComfyUI's deps)

Parts (each a separate worker process, single-threaded torch):
  (b) bench/score_sdxl.py  scoring an SDXL-sized pair: per-layer vs batched (no ComfyUI)
  (a) bench/sampling.py    sampling time: K-LoRA Fuse vs direct merge vs peer stand-in,
  (d)                      and K-LoRA's re-bake work per step
  (e) bench/quantized.py   K-LoRA vs two LoraLoaders on an fp8 and a GGUF Q8_0 model (GGUF: auto = bypass and
                           mode live side by side; alone: --only quantized)
  (c) bench/memory.py      peak RSS, one process per method

Results: ``<out-dir>/<date>-cpu.json`` and ``<out-dir>/<date>-cpu.md``
(``-cpu-quick`` with --quick, ``-cpu-quantized`` with --only quantized); default out-dir bench/results.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GOAL_TIME = 1.05
GOAL_RSS = 1.10


def run_worker(script: str, args: list, json_path: Path, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, str(common.BENCH_DIR / script), "--json", str(json_path)] + args
    common.log("running " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    tail = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # worker progress lines are passed on as they come
            tail = (tail + [line])[-60:]
            if line.startswith("[bench"):
                print("    " + line, end="", file=sys.stderr, flush=True)
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                raise SystemExit(f"{script} ran longer than {timeout:.0f} s")
        returncode = proc.wait()
    if returncode != 0:
        print("".join(tail), file=sys.stderr)
        raise SystemExit(f"{script} failed with exit status {returncode}")
    common.log(f"{script} done in {time.perf_counter() - t0:.0f} s")
    return json.loads(json_path.read_text())


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def goal(ratio, limit, quick=False):
    if ratio is None:
        return "–"
    if quick:
        return f"(≤ {limit:.2f} is for the full run)"
    return f"≤ {limit:.2f}: {'met' if ratio <= limit else 'MISSED'}"


def goal_pair(wall, cpu, limit, quick=False):
    """Goal check of a wall-clock and a CPU-time ratio, each named when it misses."""
    if quick:
        return f"(≤ {limit:.2f} is for the full run)"
    missed = [name for name, r in (("wall", wall), ("CPU", cpu)) if r > limit]
    if not missed:
        return f"≤ {limit:.2f}: met (wall and CPU)"
    if len(missed) == 2:
        return f"≤ {limit:.2f}: MISSED (wall and CPU)"
    return f"≤ {limit:.2f}: {missed[0]} MISSED, {'CPU' if missed[0] == 'wall' else 'wall'} met"


def make_table(res: dict) -> str:
    m = res["machine"]
    s = res["sampling"]
    cfg = s["settings"]
    lines = [
        f"K-LoRA benchmark, {'QUICK smoke run, ' if res['quick'] else ''}{res['date']}: CPU {m['cpu']}, "
        f"{m['cores']} cores, no GPU, torch {m.get('torch')} single-threaded. "
        f"Sampling model: SD1.5-class UNet, {s['model_params'] / 1e6:.0f} M parameters "
        f"(channels {s['model_config']['model_channels']}, channel_mult {s['model_config']['channel_mult']}, "
        f"1 res block/level, transformer depth 1, context {s['model_config']['context_dim']}), "
        f"{cfg['latent']}x{cfg['latent']} latent, {cfg['steps']} steps {cfg['sampler']}/{cfg['scheduler']}, "
        f"cfg {cfg['cfg']}, medians of {cfg['repeats']} interleaved runs.",
        "",
        "| part | measurement | K-LoRA / new | baseline | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for rank, r in s["ranks"].items():
        med, mc = r["median"], r["median_cpu"]
        rw, rc = r["ratio_klora_merge"], r["ratio_klora_merge_cpu"]
        lines.append(f"| (a) sampling | rank {rank}: s per image, K-LoRA Fuse vs direct merge (wall / CPU) | "
                     f"{fmt(med['klora'])} / {fmt(mc['klora'])} | {fmt(med['merge'])} / {fmt(mc['merge'])} | "
                     f"{rw:.3f} / {rc:.3f} | {goal_pair(rw, rc, GOAL_TIME, res['quick'])} |")
        st, sc = r["median_step_1_to_end"], r["median_cpu_step_1_to_end"]
        lines.append(f"| (a) sampling | rank {rank}: s per step (steps 1..N-1, re-bakes included), K-LoRA vs merge "
                     f"(wall / CPU) | {fmt(st['klora'])} / {fmt(sc['klora'])} | {fmt(st['merge'])} / {fmt(sc['merge'])} | "
                     f"{r['ratio_step_klora_merge']:.3f} / {r['ratio_step_klora_merge_cpu']:.3f} | – |")
        lines.append(f"| (a) sampling | rank {rank}: s per image, peer stand-in (top-K at every forward) vs merge "
                     f"(wall / CPU) | {fmt(med['peer'])} / {fmt(mc['peer'])} | {fmt(med['merge'])} / {fmt(mc['merge'])} | "
                     f"{r['ratio_peer_merge']:.2f} / {r['ratio_peer_merge_cpu']:.2f} | – |")
        lines.append(f"| (a) one-time | rank {rank}: K-LoRA Fuse incl. scoring {r['switched_weights']} weights, "
                     f"first / cached (s) | {fmt(r['fuse_seconds_first'])} / {fmt(r['fuse_seconds_cached'])} | – | – | – |")
    for rank, r in s["ranks"].items():
        rb = r["rebake_per_round"][-1]
        by_step = r["rebake_last_round_by_step"]
        restore = by_step.get("restore", {}).get("weights", 0)
        at_steps = ", ".join(f"{k}: {v['weights']}" for k, v in sorted(
            ((k, v) for k, v in by_step.items() if k != "restore"), key=lambda kv: int(kv[0])))
        n_steps = cfg["steps"]
        lines.append(f"| (d) per-step work | rank {rank}, {n_steps} steps: weights re-baked per image, by step "
                     f"(step: weights) + restore after sampling | {rb['rebaked']} ({at_steps}; restore {restore}) | "
                     f"{r['switched_weights']} switched weights | {rb['rebaked'] / r['switched_weights']:.2f} | – |")
        rebake_s = common.median(r["rebake_seconds_per_image"])
        lines.append(f"| (d) per-step work | rank {rank}: K-LoRA's own work per image = re-bake time incl. restore, s "
                     f"(share of the merge image) | {fmt(rebake_s)} | {fmt(r['median']['merge'])} | "
                     f"{rebake_s / r['median']['merge']:.3f} | – |")
    demo = s.get("no_flip_demo")
    if demo:
        nf, fl = demo["no_flip_steps"], demo["flip_steps"]
        flips = sum(demo["rebaked_by_step"].values())
        lines.append(f"| (d) per-step work | {demo['steps']}-step image, tiny model ({demo['switched_weights']} switched "
                     f"weights): steps without a flip, CPU s/step K-LoRA vs merge | {len(nf)} of {demo['steps'] - 1} "
                     f"steps, {demo['rebaked_in_no_flip_steps']} weights re-baked, "
                     f"{fmt(demo['median_cpu_step_no_flip']['klora'])} s | {fmt(demo['median_cpu_step_no_flip']['merge'])} | "
                     f"{fmt(demo['no_flip_step_ratio_cpu'])} | – |")
        lines.append(f"| (d) per-step work | same run: steps with a flip | {len(fl)} steps, {flips} weights re-baked "
                     f"(+{demo['restore_rebaked']} at restore), {fmt(demo['median_cpu_step_flip']['klora'])} s | "
                     f"{fmt(demo['median_cpu_step_flip']['merge'])} | {fmt(demo['flip_step_ratio_cpu'])} | – |")
    lines.extend(quantized_rows(res.get("quantized")))
    b = res["scoring"]
    for rank, r in b["ranks"].items():
        med = r["median"]
        lines.append(f"| (b) scoring | SDXL-sized pair ({b['weights_per_lora']} + {b['weights_per_lora']} deltas), "
                     f"rank {rank}, K={r['k']}: batched vs per-layer (s, median of {b['repeats']}) | "
                     f"{fmt(med['batched'])} | {fmt(med['per_layer'])} | {1 / r['speedup_batched']:.3f} "
                     f"({r['speedup_batched']:.1f}x faster) | faster on CPU: {'yes' if r['speedup_batched'] > 1.1 else 'NO'} |")
        lines.append(f"| (b) scoring | rank {rank}: grouping only (batched, plain torch.topk selection) vs per-layer, "
                     f"{r['grouping_only_subset_weights']} weights, 1 run | "
                     f"{fmt(r['grouping_only_batched_topk_seconds'])} | {fmt(r['grouping_only_per_layer_seconds'])} | "
                     f"{r['grouping_only_ratio']:.3f} | – |")
    flux = b.get("flux_pair")
    lines.append(f"| (b) scoring | FLUX-sized pair (GPU) | {flux if isinstance(flux, str) else 'see JSON'} | – | – | – |")
    lines.append(f"| (b) scoring | fused Triton scoring kernel (GPU) | {b.get('fused_kernel')} | – | – | – |")
    mem = res["memory"]
    if mem:
        rank = mem["rank"]
        k, mg = mem["klora"], mem["merge"]
        ratio = k["peak_rss_mib"] / mg["peak_rss_mib"]
        lines.append(f"| (c) memory | rank {rank}: peak RSS of fuse + sampling process (MiB) | {fmt(k['peak_rss_mib'])} | "
                     f"{fmt(mg['peak_rss_mib'])} | {ratio:.3f} | {goal(ratio, GOAL_RSS, res['quick'])} |")
        lines.append(f"| (c) memory | rank {rank}: RSS growth while loading LoRAs, patching, sampling (MiB) | "
                     f"{fmt(k['phase_growth_mib'])} | {fmt(mg['phase_growth_mib'])} | – | – |")
        if "peer" in mem:
            p = mem["peer"]
            lines.append(f"| (c) memory | rank {rank}: peer stand-in peak RSS / growth (MiB) | "
                         f"{fmt(p['peak_rss_mib'])} / {fmt(p['phase_growth_mib'])} | "
                         f"{fmt(mg['peak_rss_mib'])} / {fmt(mg['phase_growth_mib'])} | "
                         f"{p['peak_rss_mib'] / mg['peak_rss_mib']:.3f} | – |")
    return "\n".join(lines) + "\n"


FORMAT_NAMES = {"fp8_e4m3fn": "fp8 e4m3fn (UNETLoader weight_dtype)", "Q8_0": "GGUF Q8_0 (ComfyUI-GGUF UnetLoaderGGUF)"}


def quantized_rows(q) -> list:
    """Table rows of part (e) (bench/quantized.py): K-LoRA vs two LoraLoaders on fp8 and GGUF models."""
    if not q:
        return []
    lines = []
    for key, r in q["formats"].items():
        name = FORMAT_NAMES.get(key, key)
        if isinstance(r, str):
            lines.append(f"| (e) quantized | {name} | {r} | – | – | – |")
            continue
        med, mc, st = r["median"], r["median_cpu"], r["median_step_1_to_end"]
        for m in (m for m in med if m != "merge"):  # "klora" (the automatic mode), then forced modes
            what, tag = ("K-LoRA Fuse", "") if m == "klora" else (f"K-LoRA Fuse mode {m.split('_', 1)[1]}", "_" + m)
            lines.append(f"| (e) quantized | {name}, rank {q['rank']}: s per image, {what} vs two LoraLoaders "
                         f"(wall / CPU) | {fmt(med[m])} / {fmt(mc[m])} | {fmt(med['merge'])} / "
                         f"{fmt(mc['merge'])} | {r[f'ratio_{m}_merge']:.3f} / {r[f'ratio_{m}_merge_cpu']:.3f} | – |")
            lines.append(f"| (e) quantized | {name}: s per step (steps 1..N-1), {what} vs merge (wall) | "
                         f"{fmt(st[m])} | {fmt(st['merge'])} | {r[f'ratio_step_{m}_merge']:.3f} | – |")
            lines.append(f"| (e) quantized | {name}: how {what} switched ({r['mode' + tag]}); weights re-baked per "
                         f"image | {r['rebaked_per_image' + tag][-1]} re-baked, {r['host_live_weights' + tag]} live | "
                         f"{r['switched_weights']} switched weights | – | – |")
    return lines


def quantized_table(res: dict) -> str:
    """The table of a ``--only quantized`` run."""
    m, q = res["machine"], res["quantized"]
    cfg = q["settings"]
    model = (f"SD1.5-class UNet of part (a) (channels {q['model']['model_channels']}, channel_mult "
             f"{q['model']['channel_mult']})" if isinstance(q["model"], dict) else q["model"])
    head = (f"K-LoRA benchmark part (e), {'QUICK smoke run, ' if res['quick'] else ''}{res['date']}: CPU {m['cpu']}, "
            f"{m['cores']} cores, no GPU, torch {m.get('torch')} single-threaded. Model: {model}, "
            f"{cfg['latent']}x{cfg['latent']} latent, {cfg['steps']} steps {cfg['sampler']}/{cfg['scheduler']}, "
            f"cfg {cfg['cfg']}, medians of {cfg['repeats']} alternating runs.")
    rows = quantized_rows(q)
    return "\n".join([head, "", "| part | measurement | K-LoRA / new | baseline | ratio | goal |", "|---|---|---|---|---|---|",
                      *rows]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-size smoke run (tiny model, a few seconds per part)")
    ap.add_argument("--out-dir", default=str(common.BENCH_DIR / "results"), help="where the JSON and .md go")
    ap.add_argument("--date", default=None, help="date used in the file names (default: today, UTC)")
    ap.add_argument("--only", choices=("quantized",), help="run one part alone (quantized: part (e), "
                    "written as <date>-cpu-quantized.json/.md)")
    ap.add_argument("--table-from", metavar="JSON", help="only re-render the table of an earlier results JSON "
                    "(rewrites that JSON's table and its .md)")
    args = ap.parse_args()

    if args.table_from:
        path = Path(args.table_from)
        res = json.loads(path.read_text())
        res["table_markdown"] = quantized_table(res) if res.get("only") == "quantized" else make_table(res)
        common.write_json(path, res)
        path.with_suffix(".md").write_text(res["table_markdown"])
        print(res["table_markdown"], end="")
        return 0

    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{date}-cpu" + ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    out_dir = Path(args.out_dir)
    quick = ["--quick"] if args.quick else []
    t_start = time.perf_counter()
    res = {"date": date, "quick": args.quick, "command": "bash bench/run.sh" + (" --quick" if args.quick else "")
           + (f" --only {args.only}" if args.only else ""),
           "machine": common.machine(), "goals": {"sampling_ratio": GOAL_TIME, "peak_rss_ratio": GOAL_RSS}}
    res["machine"]["torch_threads"] = 1
    res["machine"]["gpu"] = res["machine"].get("gpu") or "none"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        long = 1800 if not args.quick else 180
        if args.only == "quantized":
            res["only"] = "quantized"
            res["quantized"] = run_worker("quantized.py", quick, tmp / "e.json", 2 * long)
            return finish(res, quantized_table(res), out_dir, stem, t_start)
        res["scoring"] = run_worker("score_sdxl.py", quick, tmp / "b.json", long)
        res["sampling"] = run_worker("sampling.py", quick, tmp / "a.json", long)
        # fp8 and GGUF casts/dequantizes every weight at every forward on a CPU: slower than part (a).
        res["quantized"] = run_worker("quantized.py", quick, tmp / "e.json", 2 * long)
        rank = max(res["sampling"]["settings"]["ranks"])
        methods = ("klora", "merge") if args.quick else ("klora", "merge", "peer")
        mem = {"rank": rank}
        # Peak RSS does not depend on CPU contention: the memory workers run concurrently.
        with concurrent.futures.ThreadPoolExecutor(len(methods)) as pool:
            futures = {method: pool.submit(run_worker, "memory.py", quick + ["--method", method, "--rank", str(rank)],
                                           tmp / f"c-{method}.json", long) for method in methods}
            for method in methods:
                mem[method] = futures[method].result()
        res["memory"] = mem
    return finish(res, make_table(res), out_dir, stem, t_start)


def finish(res: dict, table: str, out_dir: Path, stem: str, t_start: float) -> int:
    """Write ``<stem>.json`` and ``<stem>.md`` and print the table last."""
    res["total_seconds"] = time.perf_counter() - t_start
    res["table_markdown"] = table
    common.write_json(out_dir / f"{stem}.json", res)
    (out_dir / f"{stem}.md").write_text(table)
    common.log(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')} "
               f"(total {res['total_seconds']:.0f} s)")
    sys.stderr.flush()
    print(table, end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
