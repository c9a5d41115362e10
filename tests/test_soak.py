# SPDX-License-Identifier: GPL-3.0-or-later
"""Soak: many queued prompts, K-LoRA and plain, on one loaded model of a real ComfyUI server.

One server (tests/server_harness.py) with the detectable SD1.5 UNet, CLIP-L
and two demo LoRA pairs (tests/detectable_models.py) serves:

1. Reference outputs, each distinct prompt run alone: first every plain
   prompt (the base model's outputs, before K-LoRA ever ran in that server),
   then every K-LoRA prompt.
2. The soak: ``N`` prompts queued at once in a seeded random order, mixing
   K-LoRA graphs (varying seed, alpha, beta, pattern, strengths, progress
   measure and LoRA files, plus a graph with two K-LoRA Fuse nodes stacked)
   and plain graphs on the same UNETLoader output.  ``I`` of them are longer
   (30 steps) and are interrupted (POST /interrupt) when the websocket
   reports a seeded random sampler step; the prompt after each is plain.
   Every finished K-LoRA output must equal its reference bit for bit (the
   SaveLatent files), every plain output the base model's, every interrupted
   prompt must end as interrupted, no KSampler may have been served from
   ComfyUI's cache (so every prompt really sampled), and the server's RSS
   after the run must be within 5 % of its RSS after the first 10 prompts.
3. Two K-LoRA Fuse nodes on two different base models in one graph, and two
   stacked on one model: each equals the same sub-graph run alone (the
   stacked graph also differs from either fuse alone).

The default run is the CI variant (``SOAK_CI``: 30 prompts, 6 interrupted);
the long variant (``SOAK_LONG``: 100 prompts, 20 interrupted) runs with
``-m soak``.  Figures (timings, RSS) are printed; run with ``-s`` to see them.
"""
from __future__ import annotations

import queue
import random
import time
from dataclasses import dataclass, field, replace

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

#: (prompts, interrupted prompts, seed)
SOAK_CI = (30, 6, 7)
SOAK_LONG = (100, 20, 11)
#: Sampler steps of ordinary prompts and of the prompts that get interrupted.
STEPS = 4
LONG_STEPS = 30
#: An interrupt lands at a sampler step in [2, INTERRUPT_LAST_STEP] (leaves >= 20 steps of margin).
INTERRUPT_LAST_STEP = 10
RSS_TOLERANCE = 0.05
SECOND_SEED = 2026  # demo_models seed of the second LoRA pair and of the second UNet


# --------------------------------------------------------------------- graphs


@dataclass(frozen=True)
class Fuse:
    subject: str = "A"  # which demo pair the file comes from
    style: str = "A"
    subject_strength: float = 1.0
    style_strength: float = 1.0
    pattern: str = "s"
    alpha: float = 1.5
    beta: float = -1.0
    measure: str = "noise level"


@dataclass(frozen=True)
class Spec:
    """One distinct prompt: sampler seed/steps and zero, one or two stacked K-LoRA fuses."""

    seed: int
    fuses: tuple = ()
    steps: int = STEPS
    unet: str = "A"

    @property
    def klora(self) -> bool:
        return bool(self.fuses)


@dataclass
class Files:
    unet: dict = field(default_factory=dict)  # pair letter -> file name
    subject: dict = field(default_factory=dict)
    style: dict = field(default_factory=dict)
    clip: str = ""


def _sampler_part(prefix: str, model_ref, seed: int, steps: int, save_prefix: str) -> dict:
    return {
        f"{prefix}ks": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "sgm_uniform", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["lat", 0], "denoise": 1.0}},
        f"{prefix}save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}ks", 0],
                                                                 "filename_prefix": save_prefix}},
    }


def _common(files: Files) -> dict:
    return {
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": files.clip, "type": "stable_diffusion"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a dog, watercolor", "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["clip", 0]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def _model_part(prefix: str, files: Files, spec: Spec) -> tuple:
    """Nodes from UNETLoader through the K-LoRA fuses; returns (nodes, model reference)."""
    nodes = {f"{prefix}unet": {"class_type": "UNETLoader",
                               "inputs": {"unet_name": files.unet[spec.unet], "weight_dtype": "default"}}}
    model = [f"{prefix}unet", 0]
    for i, fuse in enumerate(spec.fuses):
        p = f"{prefix}f{i}_"
        nodes[p + "subject"] = {"class_type": "KLoRASubjectLoader", "inputs": {
            "lora_name": files.subject[fuse.subject], "strength": fuse.subject_strength}}
        nodes[p + "style"] = {"class_type": "KLoRAStyleLoader", "inputs": {
            "lora_name": files.style[fuse.style], "strength": fuse.style_strength}}
        nodes[p + "fuse"] = {"class_type": "KLoRAFuse", "inputs": {
            "model": model, "subject": [p + "subject", 0], "style": [p + "style", 0], "pattern": fuse.pattern,
            "alpha": fuse.alpha, "beta": fuse.beta, "scope": "attention projections", "outside_scope": "both",
            "progress_measure": fuse.measure}}
        model = [p + "fuse", 0]
    return nodes, model


def build_graph(files: Files, spec: Spec, save_prefix: str) -> dict:
    graph = _common(files)
    nodes, model = _model_part("", files, spec)
    graph.update(nodes)
    graph.update(_sampler_part("", model, spec.seed, spec.steps, save_prefix))
    return graph


def build_two_model_graph(files: Files, specs, save_prefix: str) -> dict:
    """One graph, one branch per spec (each its own UNet, fuses, KSampler and SaveLatent): node ids m<i>_*."""
    graph = _common(files)
    for i, spec in enumerate(specs):
        nodes, model = _model_part(f"m{i}_", files, spec)
        graph.update(nodes)
        graph.update(_sampler_part(f"m{i}_", model, spec.seed, spec.steps, f"{save_prefix}_m{i}"))
    return graph


# --------------------------------------------------------------------- running and reading outputs


def _latent(server, entry, node="save"):
    from safetensors.torch import load_file

    return load_file(str(server.output_file(entry, node, kind="latents")))["latent_tensor"]


def _cached_nodes(entry) -> list:
    for kind, data in (entry.get("status") or {}).get("messages") or []:
        if kind == "execution_cached":
            return list(data.get("nodes") or [])
    return []


def _status_kinds(entry) -> list:
    return [kind for kind, _ in (entry.get("status") or {}).get("messages") or []]


def _rss_mib(server) -> float:
    import psutil

    return psutil.Process(server.proc.pid).memory_info().rss / 2 ** 20


_COUNTER = [0]


def _prefix(tag: str) -> str:
    _COUNTER[0] += 1
    return f"soak/{tag}_{_COUNTER[0]:04d}"


def run_alone(server, files: Files, spec: Spec, tag: str):
    entry = server.run(build_graph(files, spec, _prefix(tag)), timeout=180)
    assert "ks" not in _cached_nodes(entry), f"{spec}: the KSampler was served from ComfyUI's cache"
    return _latent(server, entry)


# --------------------------------------------------------------------- the prompt mix


def distinct_specs():
    """The plain and K-LoRA prompts of the soak (a few of each; the soak repeats them)."""
    plain = [Spec(seed=s) for s in (101, 102, 103, 104)]
    klora = [
        Spec(seed=201, fuses=(Fuse(),)),
        Spec(seed=202, fuses=(Fuse(pattern="s*"),)),
        Spec(seed=203, fuses=(Fuse(alpha=2.0, beta=0.3, subject_strength=0.8, style_strength=1.2),)),
        Spec(seed=204, fuses=(Fuse(subject="B", style="B", alpha=1.0, beta=0.5),)),
        Spec(seed=205, fuses=(Fuse(subject="B", style="B", pattern="s*", beta=1.0, subject_strength=1.3,
                                   style_strength=0.7),)),
        Spec(seed=206, fuses=(Fuse(subject="A", style="B"),)),
        Spec(seed=207, fuses=(Fuse(subject="B", style="A", alpha=3.0, beta=0.2, measure="step count"),)),
        Spec(seed=208, fuses=(Fuse(alpha=0.0, beta=0.0),)),  # subject everywhere
        Spec(seed=209, fuses=(Fuse(), Fuse(subject="B", style="B", pattern="s*", subject_strength=0.6))),  # stacked
    ]
    return plain, klora


@dataclass
class Entry:
    spec: Spec
    interrupt_at: int = 0  # sampler step at which to interrupt (0: run to the end)


def soak_schedule(n_prompts: int, n_interrupts: int, seed: int, plain, klora):
    """``n_prompts`` entries: ``n_interrupts`` blocks [interrupted long prompt, plain prompt] among random ones.

    No entry repeats the one before it (ComfyUI would serve the repeat from its cache).
    """
    rng = random.Random(seed)
    assert n_prompts >= 2 * n_interrupts + 1
    n_free = n_prompts - 2 * n_interrupts
    slots = ["free"] * n_free + ["block"] * n_interrupts
    rng.shuffle(slots)
    entries = []

    def pick(pool):
        while True:
            spec = rng.choice(pool)
            if not entries or entries[-1].spec != spec:
                return spec

    for number, slot in enumerate(slots):
        if slot == "free":
            entries.append(Entry(pick(plain if rng.random() < 0.35 or not entries else klora)))
        else:
            base = klora[number % len(klora)] if number % 4 else plain[number % len(plain)]
            long_spec = replace(base, steps=LONG_STEPS)
            entries.append(Entry(long_spec, interrupt_at=rng.randint(2, INTERRUPT_LAST_STEP)))
            entries.append(Entry(pick(plain)))
    assert len(entries) == n_prompts
    return entries


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def soak_server(comfy):
    """A real ComfyUI server with two UNets, CLIP-L and two LoRA pairs; yields ``(server, Files, figures)``."""
    from support import detectable_models
    from support import server_harness

    t0 = time.perf_counter()
    with server_harness.ComfyServer() as server:
        names = detectable_models.write_all(server)
        subject_b, style_b = detectable_models.write_demo_loras(server.loras_dir, seed=SECOND_SEED)
        unet_b = detectable_models.write_unet(server.unet_dir, seed=SECOND_SEED)
        files = Files(unet={"A": names["unet"], "B": unet_b}, subject={"A": names["subject"], "B": subject_b},
                      style={"A": names["style"], "B": style_b}, clip=names["clip"])
        figures = {"server_ready_s": time.perf_counter() - t0}
        plain, klora = distinct_specs()
        t1 = time.perf_counter()
        base = {spec: run_alone(server, files, spec, "base") for spec in plain}  # before any K-LoRA ran
        expected = {spec: run_alone(server, files, spec, "alone") for spec in klora}
        figures["reference_runs_s"] = time.perf_counter() - t1
        figures["reference_runs"] = len(base) + len(expected)
        yield server, files, figures, base, expected
        assert server.running(), "the server died"


# --------------------------------------------------------------------- the soak itself


def _soak(soak_server, n_prompts, n_interrupts, seed):
    server, files, figures, base, expected = soak_server
    plain, klora = distinct_specs()
    entries = soak_schedule(n_prompts, n_interrupts, seed, plain, klora)
    events = server.open_events()
    assert events is not None, "no websocket: the interrupts need the sampler's progress events"
    try:
        t0 = time.perf_counter()
        ids = [server.post_prompt(build_graph(files, e.spec, _prefix("soak"))) for e in entries]
        by_id = dict(zip(ids, entries))
        pending_interrupts = {pid: e.interrupt_at for pid, e in by_id.items() if e.interrupt_at}
        interrupted_at, done, rss_after_10 = {}, [], None
        deadline = time.monotonic() + 60 + 3 * n_prompts
        while len(done) < len(ids):
            assert time.monotonic() < deadline, f"the soak did not finish in time ({len(done)}/{len(ids)} done)"
            assert server.running(), f"the server died: {server.log_text()[-2000:]}"
            try:
                event = events.events.get(timeout=0.5)
            except queue.Empty:
                continue
            kind, data = event.get("type"), event.get("data") or {}
            pid = data.get("prompt_id")
            if kind == "progress" and pid in pending_interrupts and str(data.get("node")) == "ks" \
                    and int(data.get("value", 0)) >= pending_interrupts[pid]:
                server.interrupt()
                interrupted_at[pid] = int(data["value"])
                del pending_interrupts[pid]
            finished = kind in ("execution_success", "execution_interrupted", "execution_error") or (
                kind == "executing" and data.get("node") is None and pid is not None)
            if finished and pid in by_id and pid not in done:
                done.append(pid)
                if len(done) == 10:
                    rss_after_10 = _rss_mib(server)
        soak_s = time.perf_counter() - t0
    finally:
        events.close()
    rss_end = _rss_mib(server)

    # Every prompt: the expected outcome, bit for bit, and really sampled (not a cached KSampler).
    problems, n_klora, n_plain = [], 0, 0
    for number, pid in enumerate(ids):
        entry, record = by_id[pid], server.history(pid)
        label = f"prompt {number} ({'K-LoRA' if entry.spec.klora else 'plain'}, seed {entry.spec.seed})"
        if record is None:
            problems.append(f"{label}: no history entry")
            continue
        if "ks" in _cached_nodes(record):
            problems.append(f"{label}: its KSampler was served from ComfyUI's cache")
        kinds = _status_kinds(record)
        if entry.interrupt_at:
            if "execution_interrupted" not in kinds:
                problems.append(f"{label}: interrupt requested at step {entry.interrupt_at} but it ended {kinds}")
            continue
        if "execution_success" not in kinds:
            problems.append(f"{label}: did not succeed: {kinds} {record.get('status')}"[:600])
            continue
        import torch

        out = _latent(server, record)
        reference = expected[entry.spec] if entry.spec.klora else base[entry.spec]
        if not torch.equal(out, reference):
            after = by_id[ids[number - 1]] if number else None
            problems.append(f"{label}: output differs from the same prompt run alone"
                            + (" (right after an interrupted prompt)" if after and after.interrupt_at else ""))
        n_klora += entry.spec.klora
        n_plain += not entry.spec.klora
    assert not problems, "\n".join(problems)
    assert len(interrupted_at) == n_interrupts, (interrupted_at, pending_interrupts)

    # One more plain run at the end (not the last prompt's spec, which ComfyUI would serve from its cache).
    import torch

    final_spec = next(spec for spec in plain if spec != entries[-1].spec)
    assert torch.equal(run_alone(server, files, final_spec, "final"), base[final_spec])

    growth = (rss_end - rss_after_10) / rss_after_10
    print(f"\nsoak: {n_prompts} prompts ({n_klora} K-LoRA, {n_plain} plain, {n_interrupts} interrupted at steps "
          f"{sorted(interrupted_at.values())}) in {soak_s:.1f} s; server RSS {rss_after_10:.0f} MiB after 10 "
          f"prompts, {rss_end:.0f} MiB after {n_prompts} ({100 * growth:+.2f} %); server ready in "
          f"{figures['server_ready_s']:.1f} s, {figures['reference_runs']} reference runs in "
          f"{figures['reference_runs_s']:.1f} s")
    assert abs(growth) <= RSS_TOLERANCE, f"server RSS {rss_after_10:.0f} -> {rss_end:.0f} MiB ({100 * growth:+.1f} %)"


def test_soak_ci(soak_server):
    _soak(soak_server, *SOAK_CI)


@pytest.mark.soak
def test_soak_long(soak_server, request):
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long soak (100 prompts, 20 interrupted) runs with: bash scripts/test.sh -m soak")
    _soak(soak_server, *SOAK_LONG)


# --------------------------------------------------------------------- several K-LoRA fuses in one graph


def test_two_fuses_on_two_models_in_one_graph(soak_server):
    import torch

    server, files, _, base, expected = soak_server
    specs = (Spec(seed=301, fuses=(Fuse(),)), Spec(seed=302, unet="B", fuses=(Fuse(subject="B", style="B"),)))
    # Alone first, then a plain prompt: ComfyUI caches by input signature (not node id) and keeps only what
    # the latest prompt used, so the two-model graph below must sample both branches again.
    alone = [run_alone(server, files, spec, "two_models_alone") for spec in specs]
    plain_b = run_alone(server, files, Spec(seed=302, unet="B"), "two_models_plain")
    entry = server.run(build_two_model_graph(files, specs, _prefix("two_models")), timeout=180)
    assert not {"m0_ks", "m1_ks"} & set(_cached_nodes(entry)), _cached_nodes(entry)
    together = [_latent(server, entry, f"m{i}_save") for i in range(2)]
    assert torch.equal(together[0], alone[0])
    assert torch.equal(together[1], alone[1])
    assert not torch.equal(alone[1], plain_b)  # the fuse on the second model did something
    assert not torch.equal(together[0], together[1])
    assert torch.equal(run_alone(server, files, Spec(seed=101), "two_models_base"), base[Spec(seed=101)])


def test_two_fuses_stacked_on_one_model(soak_server):
    import torch

    server, files, _, base, expected = soak_server
    plain, klora = distinct_specs()
    stacked = next(spec for spec in klora if len(spec.fuses) == 2)
    again = run_alone(server, files, stacked, "stacked")
    assert torch.equal(again, expected[stacked])
    first_only = run_alone(server, files, replace(stacked, fuses=stacked.fuses[:1]), "stacked_first")
    second_only = run_alone(server, files, replace(stacked, fuses=stacked.fuses[1:]), "stacked_second")
    assert not torch.equal(again, first_only) and not torch.equal(again, second_only)
    assert torch.equal(run_alone(server, files, plain[1], "stacked_base"), base[plain[1]])
