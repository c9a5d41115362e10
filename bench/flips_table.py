# SPDX-License-Identifier: GPL-3.0-or-later
"""The markdown table of bench/flips.py's results (also ``bench/flips.py --table-from JSON``)."""
from __future__ import annotations

MIB = 1024 ** 2


def _f(x, digits=3):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(res: dict) -> str:
    t = res["time"]
    s = t["settings"]
    m = res["machine"]
    model = "full-size SDXL UNet" if s["model"] == "full" else "QUICK smoke run, tiny SDXL-shaped UNet"
    lines = [
        f"K-LoRA flips, {res['date']}: {model}, {t['params'] / 1e6:.0f} M parameters ({s['dtype']}, random), "
        f"{t['switched_weights']} switched weights ({t['switched_bytes'] / MIB:.0f} MiB); kohya LoRAs rank "
        f"{s['ranks'][0]} + {s['ranks'][1]} on every attention projection; {s['steps']} steps {s['sampler']}/"
        f"{s['scheduler']}, cfg {s['cfg']}; device {s['device']} ({m.get('gpu') or m['cpu']}, torch "
        f"{m.get('torch')}{', 1 thread' if s['device'] == 'cpu' else ''}); medians of {s['rounds']} interleaved "
        f"rounds; steady state (ComfyUI's model load excluded).",
        "",
        "| size | method | s per image (wall / CPU) | ratio to merge (wall / CPU) | flips at steps, s (wall / CPU) "
        "| restore, s (wall / CPU) | weights computed / swapped per image |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, r in t["sizes"].items():
        for method, med in r["median"].items():
            work = "–" if method == "merge" else f"{med['computed']:.0f} / {med['swapped']:.0f}"
            lines.append(
                f"| {size} px | {method} | {_f(med['wall'])} / {_f(med['cpu'])} | {r['ratio_wall'][method]:.3f} / "
                f"{r['ratio_cpu'][method]:.3f} | {_f(med['flip_wall'])} / {_f(med['flip_cpu'])} | "
                f"{_f(med['restore_wall'])} / {_f(med['restore_cpu'])} | {work} |")
    lines.append("")
    lines.extend(_goals(res))
    return "\n".join(lines) + "\n"


def _goals(res: dict) -> list:
    out = [_time_goal(res, size, r) for size, r in res["time"]["sizes"].items()]
    if res.get("memory"):
        out.append(_memory_goal(res))
    return out


def _time_goal(res: dict, size: str, r: dict) -> str:
    t, med = res["time"], r["median"]
    clock = "cpu" if t["settings"]["device"] == "cpu" else "wall"  # CPU seconds where cores are shared
    own = {m: med[m][f"flip_{clock}"] + med[m][f"restore_{clock}"] for m in ("one by one", "batched", "kept")}
    kept = r["ratio_cpu" if clock == "cpu" else "ratio_wall"]["kept"]
    rounds = ", ".join(f"{k[clock] / m[clock]:.3f}" for k, m in zip(r["rows"]["kept"], r["rows"]["merge"]))
    limit = res["goals"]["kept_over_merge_cpu_256"]
    goal = "" if res["quick"] or size != "256" else f" (goal ≤ {limit:.2f}: {_verdict(kept <= limit)})"
    return (f"- {size} px, {clock} seconds: K-LoRA with kept variants / merge = {kept:.3f}{goal}, per round "
            f"{rounds}; K-LoRA's own work per image (flips + restore) with kept variants {_f(own['kept'])} s = "
            f"{own['kept'] / med['merge'][clock]:.2%} of the merge image; batched {_f(own['batched'])} s vs one by "
            f"one {_f(own['one by one'])} s ({own['batched'] / own['one by one']:.2f}x: no slower "
            f"{_verdict(own['batched'] <= own['one by one'])}); the three K-LoRA ways gave bit-identical latents: "
            f"{r['klora_ways_bit_identical']}.")


def _memory_goal(res: dict) -> str:
    t, mem = res["time"], res["memory"]
    cuda = "cuda_peak_allocated_mib" in mem["merge"]
    key = "cuda_peak_allocated_mib" if cuda else "peak_rss_mib"
    merge, bat, kept = (mem[k][key] for k in ("merge", "batched", "kept"))
    anon = "" if cuda else " (allocated, RssAnon: merge {}, batched {}, kept {} MiB; the rest: the mapped weights " \
        "file)".format(*(_f(mem[k]["peak_anon_mib"]) for k in ("merge", "batched", "kept")))
    limit = res["goals"]["memory_over_merge"]
    return (f"- memory, one process per method (fuse or merge + one image), "
            f"{'peak CUDA memory allocated' if cuda else 'peak RSS'}: merge {_f(merge)} MiB, batched (kept variants "
            f"off) {_f(bat)} MiB = {bat / merge:.3f}x merge (goal ≤ {limit:.2f}: {_verdict(bat / merge <= limit)}), "
            f"kept variants {_f(kept)} MiB = {kept / merge:.3f}x (+{_f(kept - bat)} MiB over batched; the kept "
            f"spares: {_f(mem['kept']['kept_bytes'] / MIB)} MiB, one per weight that flipped; all "
            f"{t['switched_weights']} switched weights: {t['switched_bytes'] / MIB:.0f} MiB){anon}.")
