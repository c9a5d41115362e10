# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark worker (c): peak resident memory (CPU RSS) of one method, in its own process.

    python bench/memory.py --method klora|merge|peer --rank R --json OUT.json [--quick]

Builds the same model and LoRA pair as bench/sampling.py, then, as the
measured phase, does what a workflow does: read the two LoRA files, build the
patched model (K-LoRA Fuse incl. scoring / two LoraLoader-style merges /
the peer stand-in) and sample one image.  Reported: the process's peak RSS
(``resource.getrusage``: ComfyUI, torch and the model included) and the
peak RSS *growth* during the phase over the RSS just before it (psutil,
polled every 2 ms), which is where the methods differ.
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


class RssPoller:
    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=("klora", "merge", "peer"), required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    s, comfy_env = common.start_worker(args.quick)
    import comfy.sd
    import comfy.utils
    import torch
    import psutil

    base = common.build_model(s["model"])
    conds = common.conds_and_latent(s["model"], s["latent"])
    with tempfile.TemporaryDirectory() as tmp:
        subj_path, style_path = common.make_pair_files(base, args.rank, Path(tmp))
        if args.method == "klora":
            fuse_mod = comfy_env.import_pack_module("nodes.fuse")
            files_mod = comfy_env.import_pack_module("nodes.handles")
        elif args.method == "peer":
            import peer as peer_mod
        gc.collect()
        baseline = psutil.Process().memory_info().rss
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        with RssPoller() as poller:
            if args.method == "klora":
                subject = files_mod.make_handle("subject", subj_path.name, str(subj_path), 1.0)
                style = files_mod.make_handle("style", style_path.name, str(style_path), 1.0)
                patcher = fuse_mod.fuse_model(base, subject, style).model
            else:
                sd_s = comfy.utils.load_torch_file(str(subj_path), safe_load=True)
                sd_t = comfy.utils.load_torch_file(str(style_path), safe_load=True)
                if args.method == "merge":
                    patcher, _ = comfy.sd.load_lora_for_models(base, None, sd_s, 1.0, 0)
                    patcher, _ = comfy.sd.load_lora_for_models(patcher, None, sd_t, 1.0, 0)
                else:
                    patcher, state = peer_mod.attach(base, sd_s, sd_t)
                    state.start(s["steps"])
            out = common.sample(patcher, s, conds)
        seconds = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mib = 1024 * 1024
    common.write_json(args.json, {
        "method": args.method, "rank": args.rank,
        "peak_rss_mib": maxrss / mib,
        "peak_rss_before_phase_mib": maxrss_before / mib,
        "rss_before_phase_mib": baseline / mib,
        "phase_peak_rss_mib": poller.peak / mib,
        "phase_growth_mib": (poller.peak - baseline) / mib,
        "phase_seconds": seconds,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
