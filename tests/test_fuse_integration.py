"""K-LoRA Fuse with the rest of ComfyUI: plain-LoRA equivalence, restore after every exit path,
lowvram partial loads, stacking with other patches, and the real node registry."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from support import brute_force
from support import lora_factory
from support import tiny_models
from test_fuse_exact import ATOL, RTOL, _full_sigmas, _handles, _sample

FAMILY = "sd15"


def _plain_lora(model, state_dict, strength):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, state_dict, strength, 0.0)[0]


def _fused(pack, tmp_path, model, **kwargs):
    from klora_pack.nodes.fuse import fuse_model

    schedule = {k: kwargs.pop(k) for k in ("alpha", "beta", "pattern", "progress_measure", "mode") if k in kwargs}
    hs, ht, truth_s, truth_t = _handles(pack, tmp_path, model, **kwargs)
    return fuse_model(model, hs, ht, **schedule), hs, ht, truth_s, truth_t


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("winner", ["subject", "style"])
def test_one_lora_everywhere_equals_comfy_lora_loader(klora_pack, tmp_path, winner):
    """alpha = beta = 0 makes the subject win everywhere; a huge beta makes the style win everywhere."""
    model = tiny_models.build_model(FAMILY, seed=0)
    beta = 0.0 if winner == "subject" else 10.0
    result, hs, ht, _, _ = _fused(klora_pack, tmp_path, model, subject_style="kohya", style_style="kohya",
                                  strengths=(0.8, 1.2), alpha=0.0, beta=beta)
    handle = hs if winner == "subject" else ht
    ours = _sample(result.model, FAMILY, 6)
    plain = _sample(_plain_lora(model, handle.state_dict, handle.strength), FAMILY, 6)
    assert torch.equal(ours, plain)
    other = ht if winner == "subject" else hs
    assert not torch.allclose(ours, _sample(_plain_lora(model, other.state_dict, other.strength), FAMILY, 6))


def test_same_file_as_subject_and_style(klora_pack, tmp_path):
    """Allowed: both deltas are identical, so the result equals one LoraLoader (equal strengths)."""
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    model = tiny_models.build_model(FAMILY, seed=0)
    sd, _ = lora_factory.make_lora(model, "kohya", rank=4, alpha=2.0, seed=3)
    lora_factory.save_lora(sd, tmp_path / "one.safetensors")
    path = str(tmp_path / "one.safetensors")
    result = fuse_model(model, make_handle("subject", "one.safetensors", path, 1.0),
                        make_handle("style", "one.safetensors", path, 1.0))
    assert "same file" in result.report
    torch.testing.assert_close(_sample(result.model, FAMILY, 6), _sample(_plain_lora(model, sd, 1.0), FAMILY, 6),
                               atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- restore
def _interrupt_at(step):
    import comfy.model_management

    def callback(i, *args):
        if i == step:
            raise comfy.model_management.InterruptProcessingException()
    return callback


def _fail_at(step):
    def callback(i, *args):
        if i == step:
            raise RuntimeError("boom")
    return callback


@pytest.mark.parametrize("how", ["finished", "failed", "interrupted"])
def test_base_model_bit_identical_after_sampling(klora_pack, tmp_path, how):
    model = tiny_models.build_model(FAMILY, seed=0)
    before_weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    before = _sample(model, FAMILY, 6)
    result, *_ = _fused(klora_pack, tmp_path, model)
    fused_first = _sample(result.model, FAMILY, 6)
    loaded_after_first = {k: v.clone() for k, v in model.model.state_dict().items()}
    if how == "finished":
        _sample(result.model, FAMILY, 9, sampler="heun")
    else:
        callback = _fail_at(4) if how == "failed" else _interrupt_at(4)
        with pytest.raises(BaseException):
            _sample(result.model, FAMILY, 9, callback=callback)
    assert result.run.flip_events > 0
    # the loaded weights are back at the fused model's step-0 state (what ComfyUI believes it holds) ...
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, loaded_after_first[key]), key
    # ... so the fused model again starts from its step-0 weights ...
    assert torch.equal(_sample(result.model, FAMILY, 6), fused_first)
    # ... and a plain run on the same loaded model is bit-identical to before K-LoRA ran
    assert torch.equal(_sample(model, FAMILY, 6), before)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before_weights[key]), key


# ---------------------------------------------------------------- lowvram
def partially_loaded(patcher, seen: dict):
    """A clone of ``patcher`` that ComfyUI loads with half its modules offloaded (lowvram: LowVramPatch);
    ``seen`` gets the load's ``lowvram`` flag and its count of lowvram patches."""
    import comfy.patcher_extension

    clone = patcher.clone()

    def partial(executor, loaded, *args, **kwargs):
        out = executor(loaded, *args, **kwargs)
        loaded.partially_unload(loaded.offload_device, memory_to_free=loaded.model_size() // 2)
        seen["lowvram"] = loaded.model.model_lowvram
        seen["patches"] = loaded.model.lowvram_patch_counter
        return out

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "test.partial", partial)
    return clone


@pytest.mark.parametrize("mode", ["bake", "bypass"])
def test_forced_partial_load_is_exact(klora_pack, tmp_path, mode):
    """Half the modules offloaded (ComfyUI's LowVramPatch computes them live); the rest baked and re-baked.
    Bypass: the hooks wrap ComfyUI's cast-at-every-forward path of the offloaded modules."""
    model = tiny_models.build_model(FAMILY, seed=0)
    result, _, _, truth_s, truth_t = _fused(klora_pack, tmp_path, model, mode=mode)
    seen = {}
    lowvram = partially_loaded(result.model, seen)
    full = _sample(result.model, FAMILY, 8)
    partial_out = _sample(lowvram, FAMILY, 8)
    assert seen["lowvram"] and (seen["patches"] > 0 or mode == "bypass")
    torch.testing.assert_close(partial_out, full, atol=ATOL, rtol=RTOL)
    ref = brute_force.BruteForce(FAMILY, 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    torch.testing.assert_close(partial_out, _sample(ref.patcher, FAMILY, 8), atol=ATOL, rtol=RTOL)
    before = _sample(model, FAMILY, 6)
    model2 = tiny_models.build_model(FAMILY, seed=0)
    assert torch.equal(before, _sample(model2, FAMILY, 6))


# ---------------------------------------------------------------- stacking
@pytest.mark.parametrize("where", ["before", "after"])
def test_plain_lora_loader_before_or_after(klora_pack, tmp_path, where):
    from klora_pack.nodes.fuse import fuse_model

    model = tiny_models.build_model(FAMILY, seed=0)
    sd_x, truth_x = lora_factory.make_lora(model, "kohya", rank=3, alpha=None, seed=77, scope="all")
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    if where == "before":
        fused = fuse_model(_plain_lora(model, sd_x, 0.6), hs, ht).model
    else:
        fused = _plain_lora(fuse_model(model, hs, ht).model, sd_x, 0.6)
    ours = _sample(fused, FAMILY, 8)
    ref = brute_force.BruteForce(FAMILY, 0, truth_s, truth_t, extras=[(truth_x, 0.6)],
                                 full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    torch.testing.assert_close(ours, _sample(ref.patcher, FAMILY, 8), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("modes", [("auto", "auto"), ("bypass", "bypass"), ("bake", "bypass"), ("bypass", "live")])
def test_two_fuse_nodes_stacked(klora_pack, tmp_path, modes):
    """Also in bypass mode: hooks stack on one module and leave it clean, whatever the eject order."""
    from klora_pack.nodes.bypass_hooks import SwitchedForward
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    model = tiny_models.build_model(FAMILY, seed=0)
    before = _sample(model, FAMILY, 4)
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    (tmp_path / "b").mkdir()
    sd_s2, truth_s2 = lora_factory.make_lora(model, "diffusers", rank=2, alpha=1.0, seed=31)
    sd_t2, truth_t2 = lora_factory.make_lora(model, "kohya", rank=5, alpha=None, seed=32)
    lora_factory.save_lora(sd_s2, tmp_path / "b" / "s2.safetensors")
    lora_factory.save_lora(sd_t2, tmp_path / "b" / "t2.safetensors")
    hs2 = make_handle("subject", "s2.safetensors", str(tmp_path / "b" / "s2.safetensors"), 0.9)
    ht2 = make_handle("style", "t2.safetensors", str(tmp_path / "b" / "t2.safetensors"), 1.1)
    first = fuse_model(model, hs, ht, mode=modes[0])
    second = fuse_model(first.model, hs2, ht2, pattern="s*", beta=-1, mode=modes[1])
    ours = _sample(second.model, FAMILY, 10)
    ref = brute_force.BruteForce(
        FAMILY, 0, truth_s, truth_t, full_sigmas=_full_sigmas(model, "sgm_uniform", 10),
        more_pairs=[(truth_s2, truth_t2, (0.9, 1.1), 1.5, 1.275, "s*")])
    torch.testing.assert_close(ours, _sample(ref.patcher, FAMILY, 10), atol=ATOL, rtol=RTOL)
    assert first.run.flip_events > 0 and second.run.flip_events > 0
    assert torch.equal(_sample(model, FAMILY, 4), before)
    assert not [m for m in model.model.modules() if isinstance(m.__dict__.get("forward"), SwitchedForward)]


def test_model_merge_before_fuse(klora_pack, tmp_path):
    """ModelMergeSimple's patches stay applied under re-baking."""
    import comfy_extras.nodes_model_merging as merging
    from klora_pack.nodes.fuse import fuse_model

    model = tiny_models.build_model(FAMILY, seed=0)
    other = tiny_models.build_model(FAMILY, seed=9)
    merged = merging.ModelMergeSimple().merge(model, other, 0.7)[0]
    hs, ht, truth_s, truth_t = _handles(klora_pack, tmp_path, model)
    ours = _sample(fuse_model(merged, hs, ht).model, FAMILY, 8)

    base = tiny_models.build_model(FAMILY, seed=0)
    with torch.no_grad():
        other_params = dict(other.model.named_parameters())
        for name, p in base.model.named_parameters():
            if name.startswith("diffusion_model."):
                p.copy_(p * 0.7 + other_params[name] * 0.3)
    ref = brute_force.BruteForce(FAMILY, 0, truth_s, truth_t, patcher=base,
                                 full_sigmas=_full_sigmas(model, "sgm_uniform", 8))
    torch.testing.assert_close(ours, _sample(ref.patcher, FAMILY, 8), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- node registry
@pytest.fixture(scope="module")
def registry(comfy, tmp_path_factory):
    """This repo loaded by ComfyUI's own custom-node loader (init_extra_nodes), as a user install would."""
    import folder_paths
    import nodes

    custom = tmp_path_factory.mktemp("custom_nodes")
    os.symlink(comfy_env_repo(), custom / "klora-fusion")
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("custom_nodes", str(custom), is_default=True)
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes.NODE_CLASS_MAPPINGS, loras


def comfy_env_repo():
    from support import comfy_env

    return str(comfy_env.REPO_ROOT)


def test_registry_graph_matches_direct_call(registry, klora_pack, tmp_path):
    import nodes
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    mappings, loras = registry
    for node_id in ("KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse"):
        assert node_id in mappings
        spec = mappings[node_id].INPUT_TYPES()
        for section in spec.values():
            for name, (kind, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
    model = tiny_models.build_model(FAMILY, seed=0)
    sd_s, _ = lora_factory.make_lora(model, "peft", rank=4, alpha=4.0, seed=5)
    sd_t, _ = lora_factory.make_lora(model, "kohya", rank=2, seed=6)
    lora_factory.save_lora(sd_s, loras / "reg_subject.safetensors")
    lora_factory.save_lora(sd_t, loras / "reg_style.safetensors")
    subject = mappings["KLoRASubjectLoader"].execute(lora_name="reg_subject.safetensors", strength=1.0)[0]
    style = mappings["KLoRAStyleLoader"].execute(lora_name="reg_style.safetensors", strength=0.8)[0]
    out = mappings["KLoRAFuse"].execute(model=model, subject=subject, style=style, pattern="s*", alpha=1.5, beta=-1.0,
                                        scope="attention projections", outside_scope="both",
                                        progress_measure="noise level", map_steps=12)
    fused_model, report, image = out.args
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 50
    assert out.ui["images"][0]["type"] == "temp"
    assert "gamma" in report
    positive, negative = tiny_models.make_conds(FAMILY, seed=5)
    latent = {"samples": tiny_models.make_latent(FAMILY, seed=5)[0]}
    via_nodes = nodes.KSampler().sample(fused_model, 5, 6, 3.0, "euler", "sgm_uniform", positive, negative,
                                        latent)[0]["samples"]
    direct = fuse_model(model, make_handle("subject", "s", str(loras / "reg_subject.safetensors"), 1.0),
                        make_handle("style", "t", str(loras / "reg_style.safetensors"), 0.8), pattern="s*").model
    expected = nodes.KSampler().sample(direct, 5, 6, 3.0, "euler", "sgm_uniform", positive, negative,
                                       latent)[0]["samples"]
    assert torch.equal(via_nodes, expected)
