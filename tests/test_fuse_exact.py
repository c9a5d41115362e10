"""K-LoRA Fuse inside real ComfyUI sampling equals an independent brute-force reference.

The reference (brute_force.py) rebuilds ``W0 + chosen delta`` from the LoRA
factory's truth tensors at every model call; the pack's model is built by the
real fuse code from LoRA files on disk.  Outputs must agree to float
tolerance, and the run must have flipped choices (else the test proves little).
"""
from __future__ import annotations

import pytest
import torch

from support import brute_force
from support import lora_factory
from support import tiny_models

ATOL, RTOL = 2e-5, 1e-4


def _handles(pack, tmp_path, model, subject_style="kohya", style_style="peft", ranks=(4, 2), alphas=(2.0, None),
             strengths=(1.0, 1.0), seeds=(11, 22), scope="attn"):
    from klora_pack.nodes.handles import make_handle

    sd_s, truth_s = lora_factory.make_lora(model, subject_style, rank=ranks[0], alpha=alphas[0], seed=seeds[0],
                                           scope=scope)
    sd_t, truth_t = lora_factory.make_lora(model, style_style, rank=ranks[1], alpha=alphas[1], seed=seeds[1],
                                           scope=scope)
    lora_factory.save_lora(sd_s, tmp_path / "subject.safetensors")
    lora_factory.save_lora(sd_t, tmp_path / "style.safetensors")
    hs = make_handle("subject", "subject.safetensors", str(tmp_path / "subject.safetensors"), strengths[0])
    ht = make_handle("style", "style.safetensors", str(tmp_path / "style.safetensors"), strengths[1])
    return hs, ht, truth_s, truth_t


def _sample(model, family, steps, cfg=3.0, sampler="euler", scheduler="sgm_uniform", seed=5, batch=1,
            denoise=1.0, start_step=None, last_step=None, force_full_denoise=False, latent=None, noise=None,
            disable_noise=False, callback=None):
    import comfy.sample

    positive, negative = tiny_models.make_conds(family, batch=batch, seed=seed)
    if latent is None:
        latent, noise = tiny_models.make_latent(family, batch=batch, seed=seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, disable_noise=disable_noise, start_step=start_step,
                               last_step=last_step, force_full_denoise=force_full_denoise, callback=callback,
                               disable_pbar=True, seed=seed)


def _full_sigmas(model, scheduler, steps):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


CASES = [
    # family, sampler, scheduler, steps, pattern, measure, cfg, batch
    ("sd15", "euler", "sgm_uniform", 10, "s", "noise level", 3.0, 1),
    ("sd15", "heun", "sgm_uniform", 6, "s*", "noise level", 3.0, 1),
    ("sd15", "dpmpp_2m", "karras", 8, "s", "noise level", 3.0, 2),
    ("sd15", "dpm_2", "sgm_uniform", 5, "s", "step count", 1.0, 1),
    ("sdxl", "euler_ancestral", "sgm_uniform", 8, "s*", "noise level", 4.0, 1),
    ("sdxl", "dpmpp_2m", "simple", 7, "s", "step count", 3.0, 1),
    ("flux", "euler", "simple", 8, "s*", "noise level", 1.0, 1),
    ("flux", "heun", "beta", 5, "s", "noise level", 1.0, 1),
    ("sd15", "euler", "sgm_uniform", 1, "s", "noise level", 3.0, 1),
    ("sd15", "euler", "sgm_uniform", 150, "s*", "noise level", 3.0, 1),
]


@pytest.mark.parametrize("family,sampler,scheduler,steps,pattern,measure,cfg,batch", CASES)
def test_sampling_equals_brute_force(klora_pack, tmp_path, family, sampler, scheduler, steps, pattern, measure,
                                     cfg, batch):
    from klora_pack.nodes.fuse import fuse_model

    model = tiny_models.build_model(family, seed=0)
    styles = ("kohya", "diffusers") if family == "flux" else ("kohya", "peft")
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model, *styles)
    alpha, beta = (1.5, 0.5) if pattern == "s" else (1.5, 1.275)
    result = fuse_model(model, hs, ht, alpha=alpha, beta=beta, pattern=pattern, progress_measure=measure)
    ours = _sample(result.model, family, steps, cfg=cfg, sampler=sampler, scheduler=scheduler, batch=batch)

    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, alpha=alpha, beta=beta, pattern=pattern,
                                 measure=measure, full_sigmas=_full_sigmas(model, scheduler, steps))
    ref.pass_sigmas = [float(s) for s in _full_sigmas(model, scheduler, steps)]
    expected = _sample(ref.patcher, family, steps, cfg=cfg, sampler=sampler, scheduler=scheduler, batch=batch)

    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    # The reference really switched LoRAs during the run (else this proves little).
    selections = {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log}
    assert selections == {True, False}
    if steps > 1:
        assert result.run.flip_events > 0
    if family == "flux":  # kohya's fused qkv against diffusers' q/k/v slices: switched as whole weights
        assert "different layouts" in result.report


def test_denoise_below_one_uses_noise_level(klora_pack, tmp_path):
    """img2img: the run starts part-way; progress comes from the noise level of the truncated schedule."""
    from klora_pack.nodes.fuse import fuse_model

    family, steps, denoise = "sd15", 6, 0.5
    model = tiny_models.build_model(family, seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = fuse_model(model, hs, ht)
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn((1, 4, 8, 8), generator=gen)
    noise = torch.randn((1, 4, 8, 8), generator=gen)
    ours = _sample(result.model, family, steps, latent=latent, noise=noise, denoise=denoise)
    total = int(steps / denoise)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", total))
    expected = _sample(ref.patcher, family, steps, latent=latent, noise=noise, denoise=denoise)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    assert min(ref.progress_log) == pytest.approx((total - steps) / total)


@pytest.mark.parametrize("measure", ["noise level", "step count"])
def test_split_across_two_advanced_passes(klora_pack, tmp_path, measure):
    """KSamplerAdvanced-style split: steps 0-4 then 4-10 of one 10-step schedule."""
    from klora_pack.nodes.fuse import fuse_model

    family, steps, split = "sd15", 10, 4
    model = tiny_models.build_model(family, seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = fuse_model(model, hs, ht, progress_measure=measure)
    full = _full_sigmas(model, "sgm_uniform", steps)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, measure=measure, full_sigmas=full)
    outputs = []
    for target in (result.model, ref.patcher):
        latent, noise = tiny_models.make_latent(family, seed=5)
        ref.pass_sigmas = [float(s) for s in full[: split + 1]]
        first = _sample(target, family, steps, latent=latent, noise=noise, start_step=0, last_step=split)
        ref.pass_sigmas = [float(s) for s in full[split:]]
        second = _sample(target, family, steps, latent=first, noise=torch.zeros_like(noise), start_step=split,
                         last_step=steps, disable_noise=True)
        outputs.append(second)
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=RTOL)


def test_strengths_scale_the_applied_delta(klora_pack, tmp_path):
    from klora_pack.nodes.fuse import fuse_model

    family = "sd15"
    model = tiny_models.build_model(family, seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model, strengths=(0.7, 1.3))
    result = fuse_model(model, hs, ht)
    ours = _sample(result.model, family, 8)
    full = _full_sigmas(model, "sgm_uniform", 8)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, strengths=(0.7, 1.3), full_sigmas=full)
    expected = _sample(ref.patcher, family, 8)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_cfg_split_into_separate_batches(klora_pack, tmp_path):
    """An area-restricted positive cond cannot be batched with the negative: several model calls per step."""
    import comfy.sample
    from klora_pack.nodes.fuse import fuse_model

    family, steps = "sd15", 6
    model = tiny_models.build_model(family, seed=0)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = fuse_model(model, hs, ht)
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", steps))
    positive, negative = tiny_models.make_conds(family, seed=5)
    area = [[positive[0][0] * 0.5, {"area": (4, 4, 0, 0), "strength": 1.0}]]
    outputs = []
    for target in (result.model, ref.patcher):
        latent, noise = tiny_models.make_latent(family, seed=5)
        outputs.append(comfy.sample.sample(target, noise, steps, 3.0, "euler", "sgm_uniform", positive + area,
                                           negative, latent, disable_pbar=True, seed=5))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=RTOL)
    assert len(ref.progress_log) >= 2 * steps  # really split: more than one model call per step


def test_live_mode_equals_brute_force(klora_pack, tmp_path):
    """The fallback for patchers that cache patched weights: the delta is applied live through weight wrappers."""
    from klora_pack.nodes.fuse import fuse_model

    family, steps = "sd15", 8
    model = tiny_models.build_model(family, seed=0)
    before = _sample(model, family, 4)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    result = fuse_model(model, hs, ht, pattern="s*", mode="live")
    assert result.run.mode == "live"
    assert result.model.weight_wrapper_patches  # switches live in weight wrappers ...
    assert not any(getattr(p[1], "name", "") == "klora_switch"  # ... not in the baked patch list
                   for patches in result.model.patches.values() for p in patches)
    ours = _sample(result.model, family, steps, sampler="heun")
    ref = brute_force.BruteForce(family, 0, truth_s, truth_t, alpha=1.5, beta=1.275, pattern="s*",
                                 full_sigmas=_full_sigmas(model, "sgm_uniform", steps))
    torch.testing.assert_close(ours, _sample(ref.patcher, family, steps, sampler="heun"), atol=ATOL, rtol=RTOL)
    assert result.run.flip_events > 0 and result.run.rebaked == 0
    assert torch.equal(_sample(model, family, 4), before)
