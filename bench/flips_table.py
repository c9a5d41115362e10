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
        "| size | method | s per image (wall / CPU) | ratio to merge (wall / CPU) | flips at steps, s | restore, s "
        "| weights computed / swapped per image |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, r in t["sizes"].items():
        for method, med in r["median"].items():
            work = "–" if method == "merge" else f"{med['computed']:.0f} / {med['swapped']:.0f}"
            lines.append(
                f"| {size} px | {method} | {_f(med['wall'])} / {_f(med['cpu'])} | {r['ratio_wall'][method]:.3f} / "
                f"{r['ratio_cpu'][method]:.3f} | {_f(med['flip_wall'])} | {_f(med['restore_wall'])} | {work} |")
    lines.append("")
    lines.extend(_goals(res))
    return "\n".join(lines) + "\n"


def _goals(res: dict) -> list:
    t = res["time"]
    out = []
    for size, r in t["sizes"].items():
        kept, med = r["ratio_cpu"]["kept"], r["median"]
        one = med["one by one"]["flip_wall"] + med["one by one"]["restore_wall"]
        bat = med["batched"]["flip_wall"] + med["batched"]["restore_wall"]
        goal = "" if res["quick"] or size != "256" else f" (goal ≤ {res['goals']['kept_over_merge_cpu_256']:.2f}: " \
            f"{_verdict(kept <= res['goals']['kept_over_merge_cpu_256'])})"
        out.append(f"- {size} px: K-LoRA with kept variants / merge = {kept:.3f} CPU{goal}; batched flips + restore "
                   f"{_f(bat)} s vs one by one {_f(one)} s ({bat / one:.2f}x; no slower: {_verdict(bat <= one)}); "
                   f"the three K-LoRA ways gave bit-identical latents: {r['klora_ways_bit_identical']}.")
    mem = res.get("memory") or {}
    if mem:
        cuda = "cuda_peak_allocated_mib" in mem["merge"]
        key = "cuda_peak_allocated_mib" if cuda else "peak_rss_mib"
        merge, bat, kept = (mem[k][key] for k in ("merge", "batched", "kept"))
        extra = mem["kept"]["kept_bytes"] / MIB
        anon = "" if cuda else " (allocated, RssAnon: merge {}, batched {}, kept {} MiB; the rest: the mapped " \
            "weights file)".format(*(_f(mem[k]["peak_anon_mib"]) for k in ("merge", "batched", "kept")))
        goal = res["goals"]["memory_over_merge"]
        out.append(f"- memory, one process per method (fuse or merge + one image), {'peak CUDA memory allocated' if cuda else 'peak RSS'}: "
                   f"merge {_f(merge)} MiB, batched (kept variants off) {_f(bat)} MiB = {bat / merge:.3f}x merge "
                   f"(goal ≤ {goal:.2f}: {_verdict(bat / merge <= goal)}), kept variants {_f(kept)} MiB = "
                   f"{kept / merge:.3f}x (+{_f(kept - bat)} MiB; the kept spares: {_f(extra)} MiB = the flipped "
                   f"weights' size; all {t['switched_weights']} switched weights: {t['switched_bytes'] / MIB:.0f} MiB)"
                   f"{anon}.")
    return out
