# SPDX-License-Identifier: GPL-3.0-or-later
"""The processes of the flips benchmark (bench/flips.py): weights file, timing, peak memory.

    python bench/flips.py --worker weights|time|memory ...   (started by bench/flips.py, not by hand)
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sdxl_full  # noqa: E402
from memory import RssPoller  # noqa: E402  (bench/memory.py)

KLORA_WAYS = {  # method -> (re-bake way, flip_cache)
    "one by one": ("one by one", "off"), "batched": ("batched", "off"),
    "kept, first image": ("batched", "on"), "kept": ("batched", "on"),
}
METHODS = ("merge",) + tuple(KLORA_WAYS)

FULL = {"model": "full", "sizes": [256], "steps": 10, "cfg": 5.0, "sampler": "euler", "scheduler": "normal",
        "ranks": [16, 64], "rounds": 3}
QUICK = {"model": "tiny", "sizes": [64], "steps": 4, "cfg": 5.0, "sampler": "euler", "scheduler": "normal",
         "ranks": [4, 8], "rounds": 1}


def settings(args) -> dict:
    s = dict(QUICK if args.quick else FULL)
    if args.sizes:
        s["sizes"] = args.sizes
    if args.rounds:
        s["rounds"] = args.rounds
    s["device"], s["dtype"], s["weights_file"] = args.device, args.dtype, args.weights_file
    return s


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall and process-CPU seconds of every call of a wrapped function, per label."""

    def __init__(self, device):
        self.device = device
        self.totals = {}

    def wrap(self, label, fn):
        """``fn`` timed under ``label`` (a string, or a function returning it at call time)."""
        def timed(*args, **kwargs):
            _sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                name = label() if callable(label) else label
                wall, cpu = self.totals.get(name, (0.0, 0.0))
                self.totals[name] = (wall + time.perf_counter() - t0, cpu + time.process_time() - c0)
        return timed

    def take(self, label):
        return self.totals.pop(label, (0.0, 0.0))


def _prepare(patchers, clock):
    from comfy.patcher_extension import WrappersMP

    for patcher in patchers:
        patcher.add_wrapper_with_key(WrappersMP.PREPARE_SAMPLING, "bench.prepare",
                                     clock.wrap("prepare", lambda executor, *a, **k: executor(*a, **k)))


def _build(s, comfy_env, folder: Path):

    fuse_mod = comfy_env.import_pack_module("nodes.fuse")
    handles = comfy_env.import_pack_module("nodes.handles")
    config = sdxl_full.SDXL_FULL if s["model"] == "full" else sdxl_full.SDXL_TINY
    t0 = time.perf_counter()
    base = sdxl_full.build_model(config, s["device"], s["dtype"], weights_file=s.get("weights_file"))
    common.log(f"model: {sdxl_full.count_params(base) / 1e6:.0f} M parameters in {time.perf_counter() - t0:.0f} s")
    subj, style = sdxl_full.make_pair_files(base, tuple(s["ranks"]), folder)
    hs = handles.make_handle("subject", subj.name, str(subj), 1.0)
    ht = handles.make_handle("style", style.name, str(style), 1.0)
    return config, base, hs, ht, fuse_mod


def worker_time(args) -> dict:
    s = settings(args)
    comfy_env = sdxl_full.setup(s["device"])
    import comfy.sd

    out = {"settings": s, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        config, base, hs, ht, fuse_mod = _build(s, comfy_env, Path(tmp))
        out["params"] = sdxl_full.count_params(base)
        t0 = time.perf_counter()
        fused = fuse_mod.fuse_model(base, hs, ht, flip_cache="off")
        out["fuse_seconds"] = time.perf_counter() - t0
        out["report"] = fused.report
        merged, _ = comfy.sd.load_lora_for_models(base, None, hs.state_dict, 1.0, 0)
        merged, _ = comfy.sd.load_lora_for_models(merged, None, ht.state_dict, 1.0, 0)
        run, clock = fused.run, Clock(s["device"])
        restoring = []  # non-empty while FuseRun.restore runs: its re-bakes count as restore, not as flips
        restore = run.restore

        def timed_restore(patcher):
            restoring.append(True)
            try:
                return restore(patcher)
            finally:
                restoring.clear()

        run.rebake = clock.wrap(lambda: "restore_rebake" if restoring else "flip", run.rebake)
        run.restore = clock.wrap("restore", timed_restore)
        _prepare([fused.model, merged], clock)
        names = {k if isinstance(k, str) else k[0] for k in fused.plan.keys}
        sd = base.model.state_dict()
        out["switched_weights"] = len(names)
        out["switched_bytes"] = sum(sd[n].numel() * sd[n].element_size() for n in names)
        del sd
        for size in s["sizes"]:
            out["sizes"][str(size)] = _time_size(s, config, size, fused, merged, run, clock)
    return out


def _one_image(s, method, patcher, run, clock, conds, seed):
    stats = run.rebaker.stats
    before = (stats.batched, stats.one_by_one, stats.swapped)
    _sync(s["device"])
    t0, c0 = time.perf_counter(), time.process_time()
    latent = sdxl_full.sample(patcher, s, conds, seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    prep_wall, prep_cpu = clock.take("prepare")
    flip, restore = clock.take("flip"), clock.take("restore")
    clock.take("restore_rebake")  # inside "restore"
    row = {"wall": wall - prep_wall, "cpu": cpu - prep_cpu, "load_wall": prep_wall, "flip_wall": flip[0],
           "flip_cpu": flip[1], "restore_wall": restore[0], "restore_cpu": restore[1]}
    if method != "merge":
        row.update(computed=stats.batched + stats.one_by_one - before[0] - before[1],
                   swapped=stats.swapped - before[2], kept_bytes=run.rebaker.store.spare_bytes(),
                   keep=stats.keep)
    return latent, row


def _time_size(s, config, size, fused, merged, run, clock) -> dict:
    import torch

    rows = {m: [] for m in METHODS}
    common.log(f"{size} px: warm-up (1 step per method)")
    warm = dict(s, steps=1)
    for patcher in (merged, fused.model):
        sdxl_full.sample(patcher, warm, sdxl_full.conds_and_latent(config, size), 0)
    for label in ("prepare", "flip", "restore", "restore_rebake"):
        clock.take(label)
    blocks = [["merge"], ["one by one"], ["batched"], ["kept, first image", "kept"]]
    identical = True
    for rnd in range(s["rounds"]):
        conds = sdxl_full.conds_and_latent(config, size, seed=rnd)
        latents = {}
        for block in blocks[rnd % 4:] + blocks[:rnd % 4]:
            for method in block:
                patcher = merged if method == "merge" else fused.model
                if method != "merge":
                    run.rebaker.way, run.rebaker.flip_cache = KLORA_WAYS[method]
                latents[method], row = _one_image(s, method, patcher, run, clock, conds, rnd)
                rows[method].append(row)
                common.log(f"{size} px round {rnd + 1}/{s['rounds']} {method}: {row['wall']:.1f} s "
                           f"({row['cpu']:.1f} s CPU), flips {row['flip_wall']:.2f} s, restore "
                           f"{row['restore_wall']:.2f} s, load {row['load_wall']:.1f} s")
        ways = [latents[m] for m in KLORA_WAYS]
        identical &= all(torch.equal(ways[0], w) for w in ways[1:])
    med = {m: {k: common.median([r[k] for r in rows[m]]) for k in rows[m][0] if k != "keep"} for m in METHODS}
    ratio = {m: common.median([r["cpu"] / mr["cpu"] for r, mr in zip(rows[m], rows["merge"])]) for m in METHODS}
    ratio_wall = {m: common.median([r["wall"] / mr["wall"] for r, mr in zip(rows[m], rows["merge"])])
                  for m in METHODS}
    return {"rows": rows, "median": med, "ratio_cpu": ratio, "ratio_wall": ratio_wall,
            "klora_ways_bit_identical": identical, "finite": bool(torch.isfinite(ways[0]).all())}


def _status_kib() -> dict:
    """This process's resident memory in KiB: RssAnon (allocated), RssFile (mapped files: the weights file)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


class MemoryPoller(RssPoller):
    """bench/memory.py's RSS poller, also keeping the peaks of RssAnon and RssFile (``.status``, KiB)."""

    def __init__(self):
        super().__init__(interval=0.01)
        self.status = _status_kib()

    def _run(self):
        while not self._stop.is_set():
            for key, value in _status_kib().items():
                self.status[key] = max(self.status[key], value)
            time.sleep(self.interval)


def worker_weights(args) -> dict:
    s = settings(args)
    sdxl_full.setup(s["device"])
    t0 = time.perf_counter()
    config = sdxl_full.SDXL_FULL if s["model"] == "full" else sdxl_full.SDXL_TINY
    written = sdxl_full.write_weights(config, s["dtype"], Path(args.weights_file))
    common.log(f"weights: {written / 1024 ** 3:.1f} GiB written to {args.weights_file} in "
               f"{time.perf_counter() - t0:.0f} s")
    return {"bytes": written}


def worker_memory(args) -> dict:
    """Peak memory of one method in its own process: fuse / merge + one image."""
    import gc
    import resource
    import torch

    s = settings(args)
    comfy_env = sdxl_full.setup(s["device"])
    import comfy.sd
    with tempfile.TemporaryDirectory() as tmp:
        config, base, hs, ht, fuse_mod = _build(s, comfy_env, Path(tmp))
        conds = sdxl_full.conds_and_latent(config, s["sizes"][0])
        gc.collect()
        cuda = s["device"] == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        baseline = _status_kib()
        with MemoryPoller() as poller:
            if args.method == "merge":
                patcher, _ = comfy.sd.load_lora_for_models(base, None, hs.state_dict, 1.0, 0)
                patcher, _ = comfy.sd.load_lora_for_models(patcher, None, ht.state_dict, 1.0, 0)
                run = None
            else:
                fused = fuse_mod.fuse_model(base, hs, ht, flip_cache=KLORA_WAYS[args.method][1])
                patcher, run = fused.model, fused.run
                run.rebaker.way = KLORA_WAYS[args.method][0]
            sdxl_full.sample(patcher, s, conds, 0)
    mib = 1024 ** 2
    res = {"method": args.method, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_anon_mib": poller.status["RssAnon"] / 1024, "peak_file_mib": poller.status["RssFile"] / 1024,
           "anon_before_mib": baseline["RssAnon"] / 1024}
    if cuda:
        res["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
    if run is not None:
        res["kept_bytes"] = run.rebaker.store.spare_bytes()
        res["keep"] = run.rebaker.stats.keep
    return res




def main(args) -> int:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    res = {"weights": worker_weights, "time": worker_time, "memory": worker_memory}[args.worker](args)
    common.write_json(args.json, res)
    return 0
