# SPDX-License-Identifier: GPL-3.0-or-later
"""The three ways K-LoRA applies the per-step choice (bake, bypass, live) and the automatic choice among them.

- Every mode, through real ComfyUI sampling, equals the independent brute-force
  reference (tests/support/brute_force.py: ``W0 + chosen delta`` rebuilt in
  float64 at every model call from the LoRA factory's truth tensors): SD1.5
  kohya + PEFT names, FLUX fused qkv from a kohya file against diffusers
  slices (parts) and diffusers against PEFT slices (row offsets), kohya conv
  LoRAs on every SD1.5 weight (scope 'all shared weights'), and LoCon with a
  Tucker mid factor.  Bypass also against bake: relative error <= 1e-5.
- Bypass never touches a weight (checked at every step), and the base model is
  bit-identical after finished, failed and interrupted runs in every mode
  (partial loads and two stacked Fuse nodes per mode: test_fuse_integration.py).
- The automatic choice, branch by branch, on a fake dynamic VRAM patcher that
  follows current ComfyUI's public surface (tests/support/fake_dynamic.py):
  classic -> bake; dynamic + low-rank LoRAs -> bypass; dynamic + a dense patch
  -> bake on the non-dynamic delegate, asked for once over ten Fuse
  executions; no delegate -> live; forced modes that cannot run -> KLoRAError
  before anything is patched.
"""
from __future__ import annotations

import pytest
import torch

from support import brute_force
from support import fake_dynamic
from support import lora_factory
from support import tiny_models
from test_fuse_exact import ATOL, RTOL, _full_sigmas, _handles, _sample
from test_fuse_integration import _fail_at, _interrupt_at

STEPS = 8
#: Bypass against bake, relative (Frobenius) error of the sampled latents, float32.
BYPASS_VS_BAKE = 1e-5

#: id -> (family, subject key style, style key style, LoRA scope, fuse scope)
CASES = {
    "sd15-kohya+peft": ("sd15", "kohya", "peft", "attn", "attention projections"),
    "flux-kohya+diffusers-parts": ("flux", "kohya", "diffusers", "attn", "attention projections"),
    "flux-diffusers+peft-offsets": ("flux", "diffusers", "peft", "attn", "attention projections"),
    "sd15-conv-lora-all-weights": ("sd15", "kohya", "kohya", "all", "all shared weights"),
}


def _fuse(model, hs, ht, **kwargs):
    from klora_pack.nodes.fuse import fuse_model

    return fuse_model(model, hs, ht, **kwargs)


def _reference(family, truth_s, truth_t, model, steps=STEPS):
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", steps))
    expected = _sample(ref.patcher, family, steps)
    assert {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log} == {True, False}
    return expected


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _hooked_modules(model_patcher) -> list:
    from klora_pack.nodes.bypass_hooks import SwitchedForward

    return [m for m in model_patcher.model.modules() if isinstance(m.__dict__.get("forward"), SwitchedForward)]


# ------------------------------------------------------------------ every mode is exact
@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_equals_brute_force(klora_pack, tmp_path, case):
    family, s_style, t_style, lora_scope, scope = CASES[case]
    model = tiny_models.build_model(family, seed=0)
    before = _sample(model, family, 4)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model, s_style, t_style, scope=lora_scope)
    expected = _reference(family, truth_s, truth_t, model)
    outputs = {}
    for mode in ("bake", "bypass", "live"):
        result = _fuse(model, hs, ht, scope=scope, mode=mode)
        assert result.run.mode == mode and f"mode {mode}: " in result.report
        assert "(chosen by the mode input)" in result.report
        outputs[mode] = _sample(result.model, family, STEPS)
        torch.testing.assert_close(outputs[mode], expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{mode}: {m}")
        assert result.run.flip_events > 0
    # current ComfyUI's dynamic VRAM patcher: auto picks bypass, never asks for a delegate
    dynamic = fake_dynamic.make_dynamic(family, seed=0)
    result = _fuse(dynamic, hs, ht, scope=scope)
    assert result.stats["mode"] == "bypass" and "dynamic VRAM" in result.report
    assert dynamic.delegate_calls == 0
    torch.testing.assert_close(_sample(result.model, family, STEPS), expected, atol=ATOL, rtol=RTOL)
    assert _relative(outputs["bypass"], outputs["bake"]) <= BYPASS_VS_BAKE
    assert torch.equal(_sample(model, family, 4), before)


def _tucker_locon(model, seed: int, rank: int = 3, alpha: float = 2.0):
    """LoCon with a Tucker mid on every 3x3 conv: down [r, in, 1, 1], mid [r, r, 3, 3], up [out, r, 1, 1].

    Truth: the composed down factor ``D[o, i] = sum_j mid[o, j] * down[j, i]`` (per kernel
    position), written here with einsum, so ``up @ D`` is the delta ComfyUI bakes.
    """
    sd_model = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    state_dict, truth = {}, {}
    for base, (key, _) in sorted(lora_factory.lora_modules(model, "kohya", "all").items()):
        w = sd_model[key]
        if w.dim() != 4 or w.shape[2:] == (1, 1):
            continue
        down = torch.randn((rank, w.shape[1], 1, 1), generator=gen) * 0.1
        mid = torch.randn((rank, rank) + tuple(w.shape[2:]), generator=gen) * 0.3
        up = torch.randn((w.shape[0], rank, 1, 1), generator=gen) * 0.1
        state_dict.update({base + ".lora_down.weight": down, base + ".lora_mid.weight": mid,
                           base + ".lora_up.weight": up, base + ".alpha": torch.tensor(alpha)})
        composed = torch.einsum("ojhw,ji->oihw", mid.double(), down[:, :, 0, 0].double())
        truth[key] = [(up, composed, alpha / rank, None)]
    return state_dict, truth


def test_locon_tucker_mid_every_mode(klora_pack, tmp_path):
    """Subject: LoCon (Tucker mid) on the 3x3 convs + a kohya attention LoRA; style: kohya LoRAs on every weight."""
    from klora_pack.nodes.handles import make_handle

    family = "sd15"
    model = tiny_models.build_model(family, seed=0)
    sd_c, truth_c = _tucker_locon(model, seed=41)
    sd_a, truth_a = lora_factory.make_lora(model, "kohya", rank=2, alpha=1.0, seed=42)
    sd_t, truth_t = lora_factory.make_lora(model, "kohya", rank=4, alpha=None, seed=43, scope="all")
    lora_factory.save_lora({**sd_c, **sd_a}, tmp_path / "locon.safetensors")
    lora_factory.save_lora(sd_t, tmp_path / "conv.safetensors")
    hs = make_handle("subject", "locon.safetensors", str(tmp_path / "locon.safetensors"), 1.0)
    ht = make_handle("style", "conv.safetensors", str(tmp_path / "conv.safetensors"), 0.8)
    ref = brute_force.BruteForce(family, 0, {**truth_c, **truth_a}, truth_t, strengths=(1.0, 0.8),
                                 full_sigmas=_full_sigmas(model, "sgm_uniform", STEPS))
    expected = _sample(ref.patcher, family, STEPS)
    outputs = {}
    for mode in ("bake", "bypass", "live"):
        result = _fuse(model, hs, ht, scope="all shared weights", mode=mode)
        outputs[mode] = _sample(result.model, family, STEPS)
        torch.testing.assert_close(outputs[mode], expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{mode}: {m}")
    assert result.run.flip_events > 0
    assert _relative(outputs["bypass"], outputs["bake"]) <= BYPASS_VS_BAKE


# ------------------------------------------------------------------ bypass leaves the weights alone
def test_bypass_never_touches_a_weight(klora_pack, tmp_path):
    family = "flux"
    model = tiny_models.build_model(family, seed=0)
    originals = {k: v.clone() for k, v in model.model.state_dict().items()}
    hs, ht, *_ = _handles(klora_pack, tmp_path, model, "kohya", "diffusers")
    result = _fuse(model, hs, ht, mode="bypass")
    assert not any(getattr(p[1], "name", "") == "klora_switch" for ps in result.model.patches.values() for p in ps)
    assert not result.model.weight_wrapper_patches
    seen = []

    def check(step, *args):
        seen.append(len(_hooked_modules(result.model)))
        for key, value in result.model.model.state_dict().items():
            assert torch.equal(value, originals[key]), (step, key)

    _sample(result.model, family, STEPS, callback=check)
    switched_modules = {k.rsplit(".", 1)[0] if isinstance(k, str) else k[0].rsplit(".", 1)[0]
                        for k in result.plan.keys}
    assert seen and set(seen) == {len(switched_modules)}
    assert result.run.flip_events > 0 and result.run.rebaked == 0
    _sample(model, family, 2)  # loading the base model ejects the hooks
    assert _hooked_modules(model) == []


# ------------------------------------------------------------------ restore on every exit path
@pytest.mark.parametrize("mode", ["bypass", "live", "auto-dynamic"])
@pytest.mark.parametrize("how", ["finished", "failed", "interrupted"])
def test_base_model_bit_identical_after_every_run(klora_pack, tmp_path, mode, how):
    family = "sd15"
    model = fake_dynamic.make_dynamic(family) if mode == "auto-dynamic" else tiny_models.build_model(family)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    before = _sample(model, family, 6)
    hs, ht, *_ = _handles(klora_pack, tmp_path, model)
    result = _fuse(model, hs, ht, mode="auto" if mode == "auto-dynamic" else mode)
    assert result.run.mode == ("bypass" if mode == "auto-dynamic" else mode)
    first = _sample(result.model, family, 6)
    if how == "finished":
        _sample(result.model, family, 9, sampler="heun")
    else:
        with pytest.raises(BaseException):
            _sample(result.model, family, 9, callback=_fail_at(4) if how == "failed" else _interrupt_at(4))
    assert result.run.flip_events > 0
    assert torch.equal(_sample(result.model, family, 6), first)  # starts again from the step-0 choice
    assert torch.equal(_sample(model, family, 6), before)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert _hooked_modules(model) == []


# ------------------------------------------------------------------ the hook chain
# (forced partial loads and two stacked Fuse nodes in every mode: tests/test_fuse_integration.py)
def test_hooks_unstack_in_any_order(klora_pack):
    """Unit check of the hook chain: lower hook removed first, a foreign wrapper on top, re-hooking."""
    from klora_pack.nodes.bypass import LowRankTerm, ModuleForm, module_geometry
    from klora_pack.nodes.bypass_hooks import SwitchedForward

    class Always:
        def uses_subject(self, unit):
            return True

    torch.manual_seed(0)
    module = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    plain = module(x)
    geometry, _ = module_geometry(module)
    terms = [[LowRankTerm(torch.randn(4, 2), torch.randn(2, 6), None, 0.5, None)] for _ in range(2)]
    hooks = [SwitchedForward(module, ModuleForm(geometry, [("u", t, t)]), Always()) for t in terms]
    expected = plain + sum(0.5 * x @ t[0].down.T @ t[0].up.T for t in terms)
    with torch.no_grad():
        for hook in hooks:
            hook.hook()
        torch.testing.assert_close(module(x), expected)
        hooks[0].unhook()  # the lower one first: spliced out of the chain
        torch.testing.assert_close(module(x), plain + 0.5 * x @ terms[1][0].down.T @ terms[1][0].up.T)
        hooks[1].unhook()
        assert "forward" not in module.__dict__ and torch.equal(module(x), plain)

        hooks[0].hook()
        inner = module.forward
        module.forward = lambda *a, **k: inner(*a, **k)  # a foreign wrapper on top of ours
        hooks[0].unhook()  # cannot splice: stays as a pass-through
        torch.testing.assert_close(module(x), plain)


@pytest.mark.parametrize("conv", [
    torch.nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1),
    torch.nn.Conv2d(4, 6, (3, 1), stride=1, padding="same", dilation=2),
    torch.nn.Conv3d(4, 6, 2, stride=(1, 2, 1), padding=(1, 0, 1)),
])
def test_conv_term_equals_baked_weight(klora_pack, conv):
    """Plain torch: the hooked convolution equals one whose weight has ``s * up @ down`` added (1-, 2-, 3-D)."""
    from klora_pack.nodes.bypass import LowRankTerm, ModuleForm, module_geometry
    from klora_pack.nodes.bypass_hooks import SwitchedForward

    class Always:
        def uses_subject(self, unit):
            return True

    torch.manual_seed(1)
    kernel = tuple(conv.weight.shape[2:])
    up, down = torch.randn(6, 3, *(1,) * len(kernel)), torch.randn(3, 4, *kernel)
    x = torch.randn(2, 4, *(7,) * len(kernel))
    baked = conv.weight + 0.7 * (up.flatten(1) @ down.flatten(1)).reshape(conv.weight.shape)
    expected = conv._conv_forward(x, baked, conv.bias)
    geometry, _ = module_geometry(conv)
    hook = SwitchedForward(conv, ModuleForm(geometry, [("u", [LowRankTerm(up, down, None, 0.7, (0, 6))], [])]),
                           Always())
    with torch.no_grad():
        hook.hook()
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
        hook.unhook()


def test_module_geometry_and_why_not(klora_pack):
    from klora_pack.nodes.bypass import module_geometry

    class DuckLinear(torch.nn.Module):  # newer ComfyUI ops classes do not subclass torch.nn.Linear
        in_features, out_features = 5, 7

    assert module_geometry(torch.nn.Linear(5, 7))[0][:3] == (0, 5, 7)
    assert module_geometry(DuckLinear())[0][:3] == (0, 5, 7)
    assert module_geometry(torch.nn.Conv2d(4, 6, 3, padding=1))[0][:4] == (2, 4, 6, (3, 3))
    for module, why in ((torch.nn.Conv2d(4, 6, 3, groups=2), "grouped"),
                        (torch.nn.ConvTranspose2d(4, 6, 3), "transposed"),
                        (torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
                        (torch.nn.LayerNorm(4), "LayerNorm")):
        geometry, reason = module_geometry(module)
        assert geometry is None and why in reason


def test_which_patches_have_a_low_rank_form(klora_pack):
    """Real ComfyUI adapters: what bypass takes (with scale and rows) and what it names as impossible."""
    from comfy.weight_adapter.loha import LoHaAdapter
    from comfy.weight_adapter.lora import LoRAAdapter
    from klora_pack.nodes.bypass import Geometry, lowrank_terms
    from klora_pack.nodes.units import make_parts

    linear = Geometry(0, 8, 12)
    up, down = torch.randn(4, 2), torch.randn(2, 8)
    lora = LoRAAdapter(set(), (up, down, 3.0, None, None, None))
    terms, _ = lowrank_terms(("w", (0, 4, 4)), lora, 0.5, linear)
    assert terms[0].rows == (4, 4) and terms[0].scale == pytest.approx(0.5 * 3.0 / 2)
    parts = make_parts([(("w", (0, 0, 4)), lora), (("w", (0, 8, 4)), lora)])
    assert [t.rows for t in lowrank_terms("w", parts, 1.0, linear)[0]] == [(0, 4), (8, 4)]
    full = LoRAAdapter(set(), (torch.randn(12, 2), down, None, None, None, None))
    for value, key, why in (
            (LoRAAdapter(set(), (up, down, None, None, torch.ones(4), None)), ("w", (0, 0, 4)), "DoRA"),
            (LoRAAdapter(set(), (up, down, None, None, None, [4, 8])), ("w", (0, 0, 4)), "reshapes"),
            (LoRAAdapter(set(), (up, down, None, torch.randn(2, 2), None, None)), ("w", (0, 0, 4)), "linear layer"),
            (full, ("w", (1, 0, 8)), "column slice"),
            (full, ("w", None, lambda a: a), "transform function"),
            (LoHaAdapter(set(), (None,) * 8), "w", "a LoHa"),
            (("diff", (torch.zeros(12, 8),)), "w", "dense 'diff' patch"),
            (make_parts([(("w", (0, 0, 4)), lora), (("w", (0, 4, 8)), ("diff", (torch.zeros(8, 8),)))]), "w",
             "dense 'diff' patch")):
        terms, reason = lowrank_terms(key, value, 1.0, linear)
        assert terms is None and why in reason, (why, reason)


def test_dynamic_without_injections_uses_the_delegate(klora_pack, tmp_path):
    """A dynamic patcher that cannot inject forward hooks: bypass is impossible, the delegate bakes."""
    source = fake_dynamic.make_dynamic("sd15")
    source.set_injections = None
    hs, ht, *_ = _handles(klora_pack, tmp_path, source)
    result = _fuse(source, hs, ht)
    assert result.run.mode == "bake" and "cannot inject forward hooks" in result.report
    assert source.delegate_calls == 1


# ------------------------------------------------------------------ the automatic choice
def _diff_style(klora_pack, tmp_path, model, seed=22):
    """A style LoRA of dense ``.diff`` patches (no low-rank form) on the square attention weights.

    Truth: ``(D, I, 1, None)``, so ``up @ down = D`` and the reference rank is the width (as the pack's).
    """
    from klora_pack.nodes.handles import make_handle

    sd_model = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    state_dict, truth = {}, {}
    for base, (key, _) in sorted(lora_factory.lora_modules(model, "kohya", "attn").items()):
        w = sd_model[key]
        if w.shape[0] != w.shape[1]:
            continue
        diff = torch.randn(w.shape, generator=gen) * 0.02
        state_dict[base + ".diff"] = diff
        truth[key] = [(diff.clone(), torch.eye(w.shape[1]), 1.0, None)]
    lora_factory.save_lora(state_dict, tmp_path / "diff.safetensors")
    return make_handle("style", "diff.safetensors", str(tmp_path / "diff.safetensors"), 1.0), truth


def _subject(klora_pack, tmp_path, model):
    from klora_pack.nodes.handles import make_handle

    sd, truth = lora_factory.make_lora(model, "kohya", rank=4, alpha=2.0, seed=11)
    lora_factory.save_lora(sd, tmp_path / "subject.safetensors")
    return make_handle("subject", "subject.safetensors", str(tmp_path / "subject.safetensors"), 1.0), truth


def test_auto_on_the_classic_patcher_bakes(klora_pack, tmp_path, sd15_model):
    from klora_pack.nodes.bypass_hooks import BYPASS_INJECTION_KEY

    hs, ht, *_ = _handles(klora_pack, tmp_path, sd15_model)
    result = _fuse(sd15_model, hs, ht)
    assert result.run.mode == "bake" and "classic patcher" in result.report
    assert not result.model.get_injections(BYPASS_INJECTION_KEY)


def test_auto_with_is_dynamic_false_bakes(klora_pack, tmp_path):
    """Current ComfyUI's classic ModelPatcher answers is_dynamic() with False."""
    source = fake_dynamic.make_dynamic("sd15")
    source.is_dynamic = lambda: False
    hs, ht, *_ = _handles(klora_pack, tmp_path, source)
    assert _fuse(source, hs, ht).run.mode == "bake"
    assert source.delegate_calls == 0


def test_dense_patch_on_dynamic_uses_the_delegate_once(klora_pack, tmp_path):
    """Ten Fuse executions on one dynamic model ask ComfyUI for the non-dynamic delegate once, and bake exactly."""
    family = "sd15"
    source = fake_dynamic.make_dynamic(family, delegate="reload")
    hs, truth_s = _subject(klora_pack, tmp_path, source)
    ht, truth_t = _diff_style(klora_pack, tmp_path, source)
    from klora_pack.nodes.modes import is_dynamic

    results = [_fuse(source, hs, ht, alpha=1.5 + 0.01 * i) for i in range(10)]
    assert source.delegate_calls == 1
    for result in results:
        assert result.run.mode == "bake" and "non-dynamic copy" in result.report and "diff" in result.report
        assert not is_dynamic(result.model) and result.model.model is not source.model
    assert len({id(r.model.model) for r in results}) == 1  # one delegate model, shared
    torch.testing.assert_close(_sample(results[0].model, family, STEPS),
                               _reference(family, truth_s, truth_t, source), atol=ATOL, rtol=RTOL)
    assert source.patches == {} and all(not v for v in source.wrappers.values())


@pytest.mark.parametrize("delegate", ["error", "dynamic"])
def test_no_delegate_falls_back_to_live(klora_pack, tmp_path, delegate):
    family = "sd15"
    source = fake_dynamic.make_dynamic(family, delegate=delegate)
    hs, truth_s = _subject(klora_pack, tmp_path, source)
    ht, truth_t = _diff_style(klora_pack, tmp_path, source)
    results = [_fuse(source, hs, ht) for _ in range(10)]
    assert source.delegate_calls == 1
    result = results[-1]
    assert result.run.mode == "live" and "no non-dynamic copy" in result.report
    if delegate == "error":
        assert fake_dynamic.DELEGATE_ERROR[:40] in result.report
    assert result.model.model is source.model
    torch.testing.assert_close(_sample(result.model, family, STEPS),
                               _reference(family, truth_s, truth_t, source), atol=ATOL, rtol=RTOL)


def test_forced_bake_on_dynamic(klora_pack, tmp_path):
    ok = fake_dynamic.make_dynamic("sd15", delegate="reload")
    hs, ht, *_ = _handles(klora_pack, tmp_path, ok)
    result = _fuse(ok, hs, ht, mode="bake")
    assert result.run.mode == "bake" and result.model.model is not ok.model and ok.delegate_calls == 1
    broken = fake_dynamic.make_dynamic("sd15", delegate="error")
    from klora_pack.klora_core.errors import KLoRAError

    with pytest.raises(KLoRAError, match="mode 'bake' on a dynamic VRAM model.*cached_patcher_init"):
        _fuse(broken, hs, ht, mode="bake")
    assert broken.patches == {} and not broken.injections


def test_forced_live_and_bypass_on_dynamic(klora_pack, tmp_path):
    source = fake_dynamic.make_dynamic("sd15")
    hs, ht, *_ = _handles(klora_pack, tmp_path, source)
    assert _fuse(source, hs, ht, mode="live").run.mode == "live"
    assert _fuse(source, hs, ht, mode="bypass").run.mode == "bypass"
    assert source.delegate_calls == 0


def _assert_untouched(model, before, family="sd15"):
    assert model.patches == {} and not model.injections and not model.weight_wrapper_patches
    assert all(not v for v in model.wrappers.values())
    assert torch.equal(_sample(model, family, 4), before)


def test_forced_bypass_without_low_rank_form_fails_before_patching(klora_pack, tmp_path):
    from klora_pack.klora_core.errors import KLoRAError

    for source in (tiny_models.build_model("sd15"), fake_dynamic.make_dynamic("sd15")):
        before = _sample(source, "sd15", 4)
        hs, _ = _subject(klora_pack, tmp_path, source)
        ht, _ = _diff_style(klora_pack, tmp_path, source)
        with pytest.raises(KLoRAError, match=r"mode 'bypass'.*style LoRA 'diff.safetensors'.*layer .*attn.*"
                                             r"dense 'diff' patch"):
            _fuse(source, hs, ht, mode="bypass")
        _assert_untouched(source, before)


@pytest.mark.parametrize("mode", ["auto", "bake", "bypass", "live"])
def test_bad_input_fails_before_anything_is_patched(klora_pack, tmp_path, mode):
    """A LoRA for another model family, in every mode, on a dynamic model: no patch, no delegate reload."""
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.handles import make_handle

    from support import detectable_models

    source = fake_dynamic.make_dynamic("sd15")
    before = _sample(source, "sd15", 4)
    detectable_models.write_flux_lora(tmp_path / "flux.safetensors")
    bad = make_handle("subject", "flux.safetensors", str(tmp_path / "flux.safetensors"), 1.0)
    _, ht, *_ = _handles(klora_pack, tmp_path, source)
    with pytest.raises(KLoRAError, match="flux.safetensors"):
        _fuse(source, bad, ht, mode=mode)
    _assert_untouched(source, before)
    assert source.delegate_calls == 0


def test_unknown_mode_is_refused(klora_pack, tmp_path, sd15_model):
    from klora_pack.klora_core.errors import KLoRAError

    hs, ht, *_ = _handles(klora_pack, tmp_path, sd15_model)
    with pytest.raises(KLoRAError, match="mode must be one of 'auto', 'bake', 'bypass', 'live', got 'fast'"):
        _fuse(sd15_model, hs, ht, mode="fast")


def test_node_offers_the_mode_input(klora_pack, tmp_path, sd15_model):
    from klora_pack.nodes.bypass_hooks import BYPASS_INJECTION_KEY
    from klora_pack.nodes.fuse_node import KLoRAFuse

    spec = KLoRAFuse.INPUT_TYPES()["optional"]["mode"]
    assert spec[0] == "COMBO" and spec[1]["options"] == ["auto", "bake", "bypass", "live"]
    assert spec[1]["default"] == "auto"
    assert spec[1].get("advanced") is True
    assert "mode" not in KLoRAFuse.INPUT_TYPES()["required"]
    hs, ht, *_ = _handles(klora_pack, tmp_path, sd15_model)
    out = KLoRAFuse.execute(model=sd15_model, subject=hs, style=ht, pattern="s", alpha=1.5, beta=-1.0,
                            scope="attention projections", outside_scope="both", progress_measure="noise level",
                            mode="bypass")
    fused, report, _ = out.args
    assert "mode bypass" in report
    assert fused.get_injections(BYPASS_INJECTION_KEY)
