"""The three ways a flip reaches the weights (nodes/rebake.py) are exact.

- one by one: ComfyUI's own per-weight path (``patch_weight_to_device``);
- batched: all weights flipping together (nodes/batched_bake.py);
- kept variants: both baked versions kept, a flip is a swap (nodes/kept_variants.py).

References, none of them the code under test: the brute-force sampler of
support/brute_force.py (``W0 + chosen delta`` rebuilt in float64 at every
model call), ComfyUI's patching arithmetic written out plainly from the LoRA
factory's truth tensors (``stochastic_rounding(W0 + (scale * up @ down))``,
bit for bit, fp8 included), and the one-by-one path, which IS ComfyUI's code.
"""
from __future__ import annotations

import pytest
import torch

from support import brute_force
from support import klora_reference
from support import lora_factory
from support import tiny_models
from test_fuse_exact import ATOL, RTOL, _full_sigmas, _handles, _sample
from test_fuse_integration import _fail_at, _interrupt_at, _plain_lora, partially_loaded

#: way -> (re-bake way, flip_cache), spelled out here rather than read from the code under test.
WAYS = {
    "one by one": ("one by one", "off"),
    "batched": ("batched", "off"),
    "kept variants": ("batched", "on"),
}


def _fuse(model, hs, ht, way, **kwargs):
    from klora_pack.nodes.fuse import fuse_model

    rebake_way, flip_cache = WAYS[way]
    result = fuse_model(model, hs, ht, flip_cache=flip_cache, **kwargs)
    result.run.rebaker.way = rebake_way
    return result


def _stats(result) -> dict:
    s = result.run.rebaker.stats
    return {"batched": s.batched, "one_by_one": s.one_by_one, "swapped": s.swapped}


def _seed_of(key: str) -> int:
    import comfy.model_patcher
    import comfy.utils

    return (getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed)(key)


# ---------------------------------------------------------------- sampling, three ways
CASES = [
    # family, subject style, style style, sampler, scheduler, steps, pattern
    ("sd15", "kohya", "peft", "euler", "sgm_uniform", 10, "s"),
    ("sdxl", "kohya", "peft", "euler_ancestral", "sgm_uniform", 8, "s*"),
    ("flux", "kohya", "diffusers", "euler", "simple", 8, "s*"),      # fused qkv vs q/k/v slices: whole-weight units
    ("flux", "diffusers", "diffusers", "heun", "simple", 5, "s"),    # q/k/v slices of the fused qkv: offset units
]


@pytest.mark.parametrize("family,style_s,style_t,sampler,scheduler,steps,pattern", CASES)
def test_three_ways_equal_brute_force_and_each_other(klora_pack, tmp_path, family, style_s, style_t, sampler,
                                                     scheduler, steps, pattern):
    model = tiny_models.build_model(family, seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model, style_s, style_t)
    alpha, beta = (1.5, 0.5) if pattern == "s" else (1.5, 1.275)
    full = _full_sigmas(model, scheduler, steps)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, alpha=alpha, beta=beta, pattern=pattern,
                                 full_sigmas=full)
    expected = _sample(ref.patcher, family, steps, sampler=sampler, scheduler=scheduler)
    outputs = {}
    for way in WAYS:
        result = _fuse(model, hs, ht, way, alpha=alpha, beta=beta, pattern=pattern)
        first = _sample(result.model, family, steps, sampler=sampler, scheduler=scheduler)
        after_first = _stats(result)
        second = _sample(result.model, family, steps, sampler=sampler, scheduler=scheduler)
        after_second = _stats(result)
        torch.testing.assert_close(first, expected, atol=ATOL, rtol=RTOL)
        assert torch.equal(second, first), way
        outputs[way] = first
        assert result.run.flip_events > 0
        computed = {k: after_second[k] - after_first[k] for k in ("batched", "one_by_one")}
        if way == "one by one":
            assert after_second["batched"] == 0 and after_second["one_by_one"] > 0
        else:
            assert after_second["one_by_one"] == 0 and after_first["batched"] > 0, after_second
        if way == "kept variants":
            assert after_first["swapped"] > 0 and after_second["swapped"] > after_first["swapped"]
            if style_s != style_t:  # one unit per weight: from the second image on, every flip is a swap
                assert computed == {"batched": 0, "one_by_one": 0}
            else:  # q, k, v of one weight flip at different steps: more states than two kept versions
                assert computed["batched"] < after_first["batched"]
            assert result.run.rebaker.stats.keep is True
        else:
            assert after_second["swapped"] == 0 and len(result.run.rebaker.store) == 0
    for way in WAYS:  # bit for bit: the batched arithmetic is ComfyUI's
        assert torch.equal(outputs[way], outputs["one by one"]), way


# ---------------------------------------------------------------- weights, bit for bit
def _model_in(dtype):
    """The tiny SD1.5 model with every diffusion weight stored in ``dtype`` (ComfyUI casts at compute)."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    model_config = sm.SD15(dict(tiny_models.CONFIGS["sd15"]))
    model_config.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
    model = model_config.get_model({}, device=torch.device("cpu"))
    model.eval()
    tiny_models.fill_seeded_(model.diffusion_model, 0)
    model.requires_grad_(False)  # as ComfyUI's loaders leave it (stochastic rounding refuses autograd)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _plain_comfy_arithmetic(w0, entries, chosen_strength, dtype, key):
    """ComfyUI's LoRA patching written out: float32 copy, += (strength * alpha/rank) * (up @ down), round."""
    import comfy.float

    temp = w0.to(torch.float32, copy=True)
    for up, down, scale, offset in entries:
        view = temp.narrow(*offset) if offset is not None else temp
        diff = torch.mm(up.to(torch.float32).flatten(1), down.to(torch.float32).flatten(1)).reshape(view.shape)
        view += (chosen_strength * scale) * diff
    return comfy.float.stochastic_rounding(temp, dtype, seed=_seed_of(key))


def _weights(patcher, names):
    params = dict(patcher.model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


@pytest.mark.parametrize("dtype,chunk", [
    (torch.float32, None), (torch.float32, 1), (torch.float16, None), (torch.bfloat16, None),
    (torch.float8_e4m3fn, None),
])
def test_rebaked_weights_bit_identical_to_comfy_arithmetic(klora_pack, tmp_path, dtype, chunk):
    """Move the choice to the last step and back with each way; every switched weight must carry exactly
    the bits ComfyUI's patching arithmetic gives for the chosen LoRA (fp8: its stochastic rounding)."""
    model = _model_in(dtype)
    names = sorted(n for n in dict(model.model.named_parameters()) if ".attn" in n and n.endswith(".weight")
                   and "norm" not in n)
    originals = _weights(model, names)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model, strengths=(0.7, 1.3))
    plan = klora_reference.reference_plan(brute_force.units_of(truth_s, 0.7), brute_force.units_of(truth_t, 1.3),
                                          1.5, 0.5, "s")
    progress = 0.9
    expected = {}
    for name in names:
        subject = plan.uses_subject(name, progress)
        truth, strength = (truth_s, 0.7) if subject else (truth_t, 1.3)
        expected[name] = _plain_comfy_arithmetic(originals[name], truth[name], strength, dtype, name)
    flipped = [n for n in names if plan.uses_subject(n, 0.0) != plan.uses_subject(n, progress)]
    assert flipped and len(flipped) < len(names)

    for way in WAYS:
        result = _fuse(model, hs, ht, way)
        if chunk is not None:
            result.run.rebaker.chunk_bytes = chunk  # one weight per batch
        patcher, run = result.model, result.run
        patcher.patch_model()  # ComfyUI bakes the step-0 choice
        step0 = _weights(patcher, names)
        for _ in range(2):  # the second round trip is served by kept variants where kept
            run.rebake(patcher, run.tracker.update(progress))
            now = _weights(patcher, names)
            for name in names:
                assert torch.equal(now[name].view(torch.uint8), expected[name].view(torch.uint8)), (way, name)
            run.rebake(patcher, run.tracker.reset())
            back = _weights(patcher, names)
            assert all(torch.equal(back[n].view(torch.uint8), step0[n].view(torch.uint8)) for n in names), way
        if dtype == torch.float32:  # and the float32 arithmetic is the float64 truth to rounding
            w64 = originals[flipped[0]].double() + sum(
                (s * (0.7 if plan.uses_subject(flipped[0], progress) else 1.3)) * (u.double() @ d.double())
                for u, d, s, _ in (truth_s if plan.uses_subject(flipped[0], progress) else truth_t)[flipped[0]])
            torch.testing.assert_close(expected[flipped[0]].double(), w64, atol=ATOL, rtol=RTOL)
        patcher.unpatch_model()
        assert all(torch.equal(w.view(torch.uint8), originals[n].view(torch.uint8))
                   for n, w in _weights(model, names).items()), way


def test_batched_falls_back_to_mm_where_bmm_differs(klora_pack, tmp_path, monkeypatch):
    """Where bmm would not give mm's bits (checked once per shape and device), each product uses mm."""
    from klora_pack.nodes import batched_bake

    model = tiny_models.build_model("sd15", seed=0)
    hs, ht, _, _ = _handles(klora_pack, tmp_path, model)
    names = sorted(n for n in dict(model.model.named_parameters()) if ".attn" in n and n.endswith(".weight"))
    bits = {}
    for exact in (True, False):
        monkeypatch.setattr(batched_bake, "_BMM_EXACT", _AlwaysDict(exact))
        result = _fuse(model, hs, ht, "batched")
        result.model.patch_model()
        result.run.rebake(result.model, result.run.tracker.update(0.95))
        bits[exact] = _weights(result.model, names)
        result.model.unpatch_model()
        assert result.run.rebaker.stats.batched > 0
    assert all(torch.equal(bits[True][n], bits[False][n]) for n in names)


class _AlwaysDict(dict):
    """A verdict cache that already holds ``value`` for every shape."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.value


def test_fp8_sampling_three_ways_bit_identical(klora_pack, tmp_path):
    """fp8 weights (ComfyUI's stochastic rounding seeded per key): the same latents, bit for bit."""
    model = _model_in(torch.float8_e4m3fn)
    hs, ht, _, _ = _handles(klora_pack, tmp_path, model)
    outputs = {}
    for way in WAYS:
        result = _fuse(model, hs, ht, way)
        outputs[way] = [_sample(result.model, "sd15", 8) for _ in range(2)]
        assert result.run.flip_events > 0 and torch.isfinite(outputs[way][0]).all()
    for way in WAYS:
        assert torch.equal(outputs[way][0], outputs["one by one"][0]) and torch.equal(outputs[way][1],
                                                                                      outputs[way][0]), way


# ---------------------------------------------------------------- base model, every exit path
@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("how", ["finished", "failed", "interrupted"])
def test_base_bit_identical_after_runs(klora_pack, tmp_path, way, how):
    model = tiny_models.build_model("sd15", seed=0)
    before_weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    before = _sample(model, "sd15", 6)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, way)
    fused_first = _sample(result.model, "sd15", 6)
    loaded_after_first = {k: v.clone() for k, v in model.model.state_dict().items()}
    if how == "finished":
        _sample(result.model, "sd15", 9, sampler="heun")
    else:
        with pytest.raises(BaseException):
            _sample(result.model, "sd15", 9, callback=_fail_at(4) if how == "failed" else _interrupt_at(4))
    for key, value in model.model.state_dict().items():  # step-0 state again, bit for bit
        assert torch.equal(value, loaded_after_first[key]), key
    assert torch.equal(_sample(result.model, "sd15", 6), fused_first)
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    torch.testing.assert_close(_sample(result.model, "sd15", 8), _sample(ref.patcher, "sd15", 8), atol=ATOL,
                               rtol=RTOL)
    assert torch.equal(_sample(model, "sd15", 6), before)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before_weights[key]), key


# ---------------------------------------------------------------- lowvram
@pytest.mark.parametrize("way", list(WAYS))
def test_partially_loaded_model_exact(klora_pack, tmp_path, way):
    """Half the modules offloaded (LowVramPatch reads the switches live), the rest re-baked the chosen way."""
    model = tiny_models.build_model("sd15", seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, way)
    seen = {}
    lowvram = partially_loaded(result.model, seen)
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    expected = _sample(ref.patcher, "sd15", 8)
    for _ in range(2):
        torch.testing.assert_close(_sample(lowvram, "sd15", 8), expected, atol=ATOL, rtol=RTOL)
    assert seen["patches"] > 0 and result.run.rebaked > 0
    for _ in range(2):  # the full load again (ComfyUI re-patches; kept variants of the partial load are stale)
        torch.testing.assert_close(_sample(result.model, "sd15", 8), expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- kept variants: when, and for how long
@pytest.mark.parametrize("reserve,keeps", [(0, True), (1 << 50, False)])
def test_auto_keeps_variants_only_when_memory_is_free(klora_pack, tmp_path, reserve, keeps):
    """``auto`` keeps variants when free memory minus their size covers the reserve (simulated low memory:
    a reserve larger than any machine's memory)."""
    model = tiny_models.build_model("sd15", seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    from klora_pack.nodes.fuse import fuse_model

    result = fuse_model(model, hs, ht)  # flip_cache defaults to auto
    result.run.rebaker.reserve = reserve
    assert "kept variants auto" in result.report
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 10))
    expected = _sample(ref.patcher, "sd15", 10)
    for _ in range(2):
        torch.testing.assert_close(_sample(result.model, "sd15", 10), expected, atol=ATOL, rtol=RTOL)
    stats, store = result.run.rebaker.stats, result.run.rebaker.store
    assert stats.keep is keeps and stats.keep_reason.startswith("auto")
    if keeps:
        # extra memory = one spare per weight that flips: the flipped weights' size
        flipped = {n for n in ref.plan.ts if any(ref.plan.uses_subject(n, i / 10) != ref.plan.uses_subject(n, 0.0)
                                                  for i in range(10))}
        params = dict(model.model.named_parameters())
        assert store.spare_bytes() == sum(params[n].numel() * params[n].element_size() for n in flipped) > 0
        assert stats.swapped > 0
    else:
        assert len(store) == 0 and stats.swapped == 0 and stats.batched > 0


def test_kept_variants_released_when_comfy_unpatches(klora_pack, tmp_path):
    import comfy.model_management

    model = tiny_models.build_model("sd15", seed=0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, "kept variants")
    first = _sample(result.model, "sd15", 8)
    assert len(result.run.rebaker.store) > 0
    comfy.model_management.unload_all_models()
    assert len(result.run.rebaker.store) == 0  # the baked tensors died with the unpatch, and their spares with them
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert torch.equal(_sample(result.model, "sd15", 8), first)


def test_other_patcher_in_between_then_kept_variants_again(klora_pack, tmp_path):
    """A plain LoRA model of the same base runs between two K-LoRA images: ComfyUI re-patches both ways."""
    model = tiny_models.build_model("sd15", seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, "kept variants")
    plain = _plain_lora(model, hs.state_dict, 1.0)
    plain_alone = _sample(plain, "sd15", 6)
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    expected = _sample(ref.patcher, "sd15", 8)
    for _ in range(2):
        torch.testing.assert_close(_sample(result.model, "sd15", 8), expected, atol=ATOL, rtol=RTOL)
        assert torch.equal(_sample(plain, "sd15", 6), plain_alone)


def test_weights_batching_cannot_reproduce_go_one_by_one(klora_pack, tmp_path):
    """A plain LoRA stacked on the switched weights: those weights take ComfyUI's path, results stay exact."""
    model = tiny_models.build_model("sd15", seed=0)
    sd_x, truth_x = lora_factory.make_lora(model, "kohya", rank=3, alpha=None, seed=77, scope="attn")
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(_plain_lora(model, sd_x, 0.6), hs, ht, "batched")
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, extras=[(truth_x, 0.6)],
                                 full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    torch.testing.assert_close(_sample(result.model, "sd15", 8), _sample(ref.patcher, "sd15", 8), atol=ATOL,
                               rtol=RTOL)
    stats = _stats(result)
    assert stats["one_by_one"] > 0 and stats["batched"] == 0


# ---------------------------------------------------------------- the node input
def test_flip_cache_input(klora_pack, tmp_path):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.fuse_node import KLoRAFuse

    kind, spec = KLoRAFuse.INPUT_TYPES()["optional"]["flip_cache"]
    assert kind == "COMBO" and spec["options"] == ["auto", "off", "on"] and spec["default"] == "auto"
    assert spec["tooltip"] and spec.get("advanced") is True
    model = tiny_models.build_model("sd15", seed=0)
    hs, ht, _, _ = _handles(klora_pack, tmp_path, model)
    with pytest.raises(KLoRAError, match="flip_cache"):
        fuse_model(model, hs, ht, flip_cache="sometimes")
    for choice, words in (("on", "kept variants on"), ("off", "kept variants off"), ("auto", "kept variants auto")):
        assert words in fuse_model(model, hs, ht, flip_cache=choice).report


@pytest.mark.parametrize("way", ["batched", "kept variants"])
def test_failure_in_the_middle_of_a_flip(klora_pack, tmp_path, monkeypatch, way):
    """Out of memory after half a batch was written: sampling fails, the restore re-bakes every weight from
    its original, kept variants are dropped (their labels can no longer be trusted), the next run is exact."""
    from klora_pack.nodes import rebake

    model = tiny_models.build_model("sd15", seed=0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, way)
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    expected = _sample(ref.patcher, "sd15", 8)
    torch.testing.assert_close(_sample(result.model, "sd15", 8), expected, atol=ATOL, rtol=RTOL)
    real = rebake.bake_jobs
    calls = []

    def half_then_fail(jobs, targets, *args):
        calls.append(len(jobs))
        if len(calls) == 1 and len(jobs) > 1:
            real(jobs[: len(jobs) // 2], targets[: len(jobs) // 2], *args)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(jobs, targets, *args)

    monkeypatch.setattr(rebake, "bake_jobs", half_then_fail)
    result.run.rebaker.store.clear()  # so the next flip computes (not swaps)
    with pytest.raises(RuntimeError, match="simulated"):
        _sample(result.model, "sd15", 8)
    assert calls and len(result.run.rebaker.store) == 0
    monkeypatch.setattr(rebake, "bake_jobs", real)
    torch.testing.assert_close(_sample(result.model, "sd15", 8), expected, atol=ATOL, rtol=RTOL)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


@pytest.mark.parametrize("way", ["batched", "kept variants"])
def test_model_updating_weights_in_place(klora_pack, tmp_path, way):
    """``weight_inplace_update`` patchers keep their Parameter objects: re-bakes write into them, and there is
    no second tensor to swap in, so kept variants stay off (saying why)."""
    model = tiny_models.build_model("sd15", seed=0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, way)
    result.model.weight_inplace_update = True
    params = dict(model.model.named_parameters())
    ref = brute_force.BruteForce("sd15", 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    torch.testing.assert_close(_sample(result.model, "sd15", 8), _sample(ref.patcher, "sd15", 8), atol=ATOL,
                               rtol=RTOL)
    assert all(p is params[n] for n, p in model.model.named_parameters())  # the same objects throughout
    stats = result.run.rebaker.stats
    assert stats.batched > 0 and stats.swapped == 0 and stats.keep is False
    if way == "kept variants":
        assert "in place" in stats.keep_reason
    result.model.unpatch_model()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
