# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark worker (a) + (d): sampling time of K-LoRA Fuse vs direct merge vs the peer stand-in.

    python bench/sampling.py --json OUT.json [--quick]

One process, one base model, one LoRA pair per rank.  Per rank the three
methods run in rounds (order rotated every round) and each round times one
full ``comfy.sample.sample`` call per method; medians over the rounds.
Every call includes ComfyUI's own model patching for that method, because
the three patchers share one base model and ComfyUI re-patches when it
switches between them.  Per-step times come from the sampler callback.

(d): the K-LoRA run's ``FuseRun.rebake`` is wrapped to record which step
re-baked how many weights and how long it took.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("klora", "merge", "peer")


def timed_sample(patcher, s, conds, recorder=None):
    """Run one sampling call; return (latent, wall s, CPU s, [wall s per step], [CPU s per step]).

    CPU time (``time.process_time``: this process, all threads) is reported
    beside wall time because other jobs share this machine's cores: it hides
    waiting for a core, not the work done.
    """
    stamps, cpu_stamps = [], []
    if recorder is not None:
        recorder.step = 0

    def callback(step, x0, x, total):
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if recorder is not None:
            recorder.step = len(stamps)  # the next model call belongs to this step index

    t0, c0 = time.perf_counter(), time.process_time()
    out = common.sample(patcher, s, conds, callback=callback)
    t1, c1 = time.perf_counter(), time.process_time()
    steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    cpu_steps = [b - a for a, b in zip([c0] + cpu_stamps[:-1], cpu_stamps)]
    return out, t1 - t0, c1 - c0, steps, cpu_steps


class RebakeRecorder:
    """Wraps ``FuseRun.rebake`` / ``restore`` on one run instance to log work per step."""

    def __init__(self, run):
        self.run = run
        self.step = 0
        self.events = []  # (phase, step or None, weights, seconds)
        self._restoring = False
        real_rebake, real_restore = run.rebake, run.restore

        def rebake(patcher, keys):
            t0 = time.perf_counter()
            n = real_rebake(patcher, keys)
            dt = time.perf_counter() - t0
            step = None if self._restoring else self.step
            self.events.append(("restore" if self._restoring else "step", step, n, dt))
            return n

        def restore(patcher):
            self._restoring = True
            try:
                return real_restore(patcher)
            finally:
                self._restoring = False

        run.rebake = rebake
        run.restore = restore

    def clear(self):
        self.events = []


def no_flip_demo(fuse_mod, files_mod, folder: Path, steps: int, rounds: int = 3) -> dict:
    """(d) on a long run: a ``steps``-step image on the tests' tiny SD1.5-shaped UNet, K-LoRA vs merge.

    With 10 steps and 80 weights nearly every step flips some weight; with
    many steps most steps flip none, which shows what such a step costs.
    """
    import comfy.sd

    cfg = dict(common.QUICK, steps=steps)
    base = common.build_model(common.SD15_TINY, seed=1)
    conds = common.conds_and_latent(common.SD15_TINY, cfg["latent"])
    subj_path, style_path = common.make_pair_files(base, 4, folder)
    subject = files_mod.make_handle("subject", subj_path.name, str(subj_path), 1.0)
    style = files_mod.make_handle("style", style_path.name, str(style_path), 1.0)
    fused = fuse_mod.fuse_model(base, subject, style)
    merged, _ = comfy.sd.load_lora_for_models(base, None, subject.state_dict, 1.0, 0)
    merged, _ = comfy.sd.load_lora_for_models(merged, None, style.state_dict, 1.0, 0)
    recorder = RebakeRecorder(fused.run)
    patchers = {"klora": fused.model, "merge": merged}
    for name in patchers:  # warm-up
        common.sample(patchers[name], dict(cfg, steps=1), conds)
    cpu_steps = {name: [] for name in patchers}
    events = []
    for rnd in range(rounds):
        for name in (("klora", "merge") if rnd % 2 == 0 else ("merge", "klora")):
            recorder.clear()
            _, _, _, _, per_step = timed_sample(patchers[name], cfg, conds, recorder if name == "klora" else None)
            cpu_steps[name].append(per_step)
            if name == "klora":
                events.append(list(recorder.events))
    by_step = {}
    for phase, step, n, _ in events[-1]:
        if phase == "step":
            by_step[step] = by_step.get(step, 0) + n
    no_flip = [i for i in range(1, steps) if i not in by_step]
    flip = sorted(by_step)

    def med(name, idx):
        return common.median([run[i] for run in cpu_steps[name] for i in idx]) if idx else None

    return {
        "model": "tests' tiny SD1.5-shaped UNet (model_channels 32), 8x8 latent",
        "steps": steps,
        "switched_weights": len(fused.plan.keys),
        "rebaked_by_step": {str(k): v for k, v in sorted(by_step.items())},
        "restore_rebaked": sum(n for phase, _, n, _ in events[-1] if phase == "restore"),
        "flip_steps": flip,
        "no_flip_steps": no_flip,
        "rebaked_in_no_flip_steps": sum(by_step.get(i, 0) for i in no_flip),
        "median_cpu_step_no_flip": {"klora": med("klora", no_flip), "merge": med("merge", no_flip)},
        "median_cpu_step_flip": {"klora": med("klora", flip), "merge": med("merge", flip)},
        "no_flip_step_ratio_cpu": (med("klora", no_flip) / med("merge", no_flip)) if no_flip else None,
        "flip_step_ratio_cpu": (med("klora", flip) / med("merge", flip)) if flip else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    s, comfy_env = common.start_worker(args.quick)
    import comfy.sd
    import comfy.utils
    import torch

    import peer as peer_mod

    fuse_mod = comfy_env.import_pack_module("nodes.fuse")
    files_mod = comfy_env.import_pack_module("nodes.handles")

    t0 = time.perf_counter()
    base = common.build_model(s["model"])
    build_s = time.perf_counter() - t0
    n_params = common.count_params(base)
    common.log(f"model built: {n_params / 1e6:.1f} M parameters in {build_s:.1f} s")
    conds = common.conds_and_latent(s["model"], s["latent"])

    result = {"settings": {k: v for k, v in s.items() if k != "model"}, "model_config": s["model"],
              "model_params": n_params, "ranks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in s["ranks"]:
            subj_path, style_path = common.make_pair_files(base, rank, Path(tmp))
            subject = files_mod.make_handle("subject", subj_path.name, str(subj_path), 1.0)
            style = files_mod.make_handle("style", style_path.name, str(style_path), 1.0)

            t0 = time.perf_counter()
            fused = fuse_mod.fuse_model(base, subject, style)
            fuse_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            fuse_mod.fuse_model(base, subject, style)
            fuse_cached_s = time.perf_counter() - t0
            run = fused.run
            n_switched = len(fused.plan.keys)
            recorder = RebakeRecorder(run)

            merged, _ = comfy.sd.load_lora_for_models(base, None, subject.state_dict, 1.0, 0)
            merged, _ = comfy.sd.load_lora_for_models(merged, None, style.state_dict, 1.0, 0)
            peer_patcher, peer_state = peer_mod.attach(base, subject.state_dict, style.state_dict)
            patchers = {"klora": fused.model, "merge": merged, "peer": peer_patcher}
            common.log(f"rank {rank}: fuse (scoring {n_switched} weights) {fuse_s:.2f} s, cached {fuse_cached_s:.3f} s")

            # warm-up: one 1-step call per method (first-call overheads, checks the peer is wired)
            warm = dict(s, steps=1)
            for name in METHODS:
                peer_state.start(1)
                common.sample(patchers[name], warm, conds)
                if name == "peer":
                    assert peer_state.calls == peer_state.n_layers, (peer_state.calls, peer_state.n_layers)
            recorder.clear()
            run.rebaked = run.flip_events = 0

            times = {m: [] for m in METHODS}
            cpu_times = {m: [] for m in METHODS}
            step_times = {m: [] for m in METHODS}
            cpu_step_times = {m: [] for m in METHODS}
            outputs = {}
            per_round_rebake = []
            for rnd in range(s["repeats"]):
                order = METHODS[rnd % 3:] + METHODS[:rnd % 3]
                for name in order:
                    peer_state.start(s["steps"])
                    calls_before = peer_state.calls
                    before = (run.rebaked, run.flip_events)
                    recorder.clear()
                    out, total, cpu, steps, cpu_steps = timed_sample(patchers[name], s, conds,
                                                                     recorder if name == "klora" else None)
                    times[name].append(total)
                    cpu_times[name].append(cpu)
                    step_times[name].append(steps)
                    cpu_step_times[name].append(cpu_steps)
                    outputs[name] = out
                    if name == "peer":
                        assert peer_state.calls == s["steps"] * peer_state.n_layers, "peer did not run every layer"
                    else:
                        assert peer_state.calls == calls_before, "peer wrappers leaked into another method"
                    if name == "klora":
                        per_round_rebake.append({
                            "rebaked": run.rebaked - before[0], "flip_events": run.flip_events - before[1],
                            "events": list(recorder.events),
                        })
                    common.log(f"rank {rank} round {rnd + 1}/{s['repeats']} {name}: {total:.2f} s ({cpu:.2f} s CPU)")
            for name, out in outputs.items():
                assert torch.isfinite(out).all(), f"{name} produced non-finite latents"
            differs = float((outputs["klora"] - outputs["merge"]).abs().max())

            med = {m: common.median(times[m]) for m in METHODS}
            med_cpu = {m: common.median(cpu_times[m]) for m in METHODS}
            # per-step: steps 1..N-1 (step 0 also holds ComfyUI's patching of the model)
            steady = {m: common.median([t for run_steps in step_times[m] for t in run_steps[1:]]) for m in METHODS}
            steady_cpu = {m: common.median([t for run_steps in cpu_step_times[m] for t in run_steps[1:]])
                          for m in METHODS}
            last = per_round_rebake[-1]
            by_step = {}
            for phase, step, n, dt in last["events"]:
                label = "restore" if phase == "restore" else str(step)
                entry = by_step.setdefault(label, {"weights": 0, "seconds": 0.0})
                entry["weights"] += n
                entry["seconds"] += dt
            flip_steps = sorted(int(k) for k in by_step if k != "restore")
            klora_steps = step_times["klora"][-1]
            merge_steps = step_times["merge"][-1]
            no_flip = [i for i in range(1, s["steps"]) if i not in flip_steps]
            # decision cost when nothing flips: the tracker's vectorised comparison
            t0 = time.perf_counter()
            for i in range(1000):
                run.tracker.evaluate(0.5)
            decide_us = (time.perf_counter() - t0) / 1000 * 1e6

            result["ranks"][str(rank)] = {
                "fuse_seconds_first": fuse_s,
                "fuse_seconds_cached": fuse_cached_s,
                "switched_weights": n_switched,
                "times": times,
                "cpu_times": cpu_times,
                "median": med,
                "median_cpu": med_cpu,
                "ratio_klora_merge": med["klora"] / med["merge"],
                "ratio_klora_merge_cpu": med_cpu["klora"] / med_cpu["merge"],
                "ratio_peer_merge": med["peer"] / med["merge"],
                "ratio_peer_merge_cpu": med_cpu["peer"] / med_cpu["merge"],
                "step_times": step_times,
                "cpu_step_times": cpu_step_times,
                "median_step_1_to_end": steady,
                "median_cpu_step_1_to_end": steady_cpu,
                "ratio_step_klora_merge": steady["klora"] / steady["merge"],
                "ratio_step_klora_merge_cpu": steady_cpu["klora"] / steady_cpu["merge"],
                "rebake_seconds_per_image": [sum(e[3] for e in r["events"]) for r in per_round_rebake],
                "klora_vs_merge_max_abs_latent_diff": differs,
                "rebake_per_round": [{k: v for k, v in r.items() if k != "events"} for r in per_round_rebake],
                "rebake_last_round_by_step": by_step,
                "flip_steps": flip_steps,
                "no_flip_steps": no_flip,
                "no_flip_step_ratio_klora_merge": (
                    common.median([klora_steps[i] for i in no_flip]) / common.median([merge_steps[i] for i in no_flip])
                    if no_flip else None),
                "decision_check_us": decide_us,
                "peer_layers": peer_state.n_layers,
            }
            del patchers, merged, peer_patcher, fused
            import comfy.model_management

            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
        common.log("(d) long run on the tiny model")
        result["no_flip_demo"] = no_flip_demo(fuse_mod, files_mod, Path(tmp), 20 if args.quick else 50)
        common.log(f"(d) long run: {len(result['no_flip_demo']['no_flip_steps'])} steps without a flip")
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
