"""K-LoRA on quantized models, loaded as users load them.

- GGUF Q8_0 / Q4_0 (the gguf package's quantizer) and Q4_K (tests/support/quantized_files.py's encoder;
  rows that do not split into 256-value blocks stay F16, as in real files), read by the REAL ComfyUI-GGUF
  pack (its UnetLoaderGGUF node; the pack is unpacked from the shared source tarball and loaded with
  ComfyUI's own ``nodes.load_custom_node``);
- fp8 e4m3fn / e5m2 through ComfyUI's UNETLoader (its ``weight_dtype`` option), ComfyUI's "scaled fp8"
  layout through UNETLoader's default, and float16 / bfloat16 weights through ComfyUI's stock loader with the
  dtype ``--fp16-unet`` / ``--bf16-unet`` (or a GPU) gives (float32 is tests/test_fuse_exact.py's).

The model is the SD1.5-detectable demo UNet (klora_core/cli/demo_models.py, 18.7 M parameters), because
the stock loaders detect the model family from the file.  Each format is checked against independent
references:

(a) forced subject (alpha = beta = 0: every switch chooses the subject) in mode bake (the patch-list path
    LoraLoaderModelOnly takes; on GGUF, ComfyUI-GGUF patches it live) equals ComfyUI's
    LoraLoaderModelOnly(subject) on the same file, bit for bit;
(b) the default schedule equals a brute-force per-step reference (tests/support/quantized_reference.py:
    the unpatched weight, dequantized, plus the chosen delta at every model call, rounded by the host's own
    rounding function where the host stores the result in fp8 / fp16); the choice flips during the run.
    The automatic mode: bypass on GGUF (the low-rank term at forward, nothing patched by ComfyUI-GGUF, so
    nothing rounded), bake on fp8 / fp16 / bf16; GGUF with a LoHa keeps ComfyUI-GGUF's live patching
    (against the same brute force, the LoHa delta written plainly), and so does a forced bake;
(c) the base model samples bit-identically before and after every K-LoRA run.

Without the ComfyUI-GGUF tarball or the ``gguf`` package the GGUF tests fail under CI=true and skip (with
the reason) elsewhere; the fp8 tests need neither.
"""
from __future__ import annotations

import pytest
import torch

from support import gguf_pack
from support import lora_factory
from support import quantized_files
from support import quantized_reference
from support import tiny_models

pytestmark = pytest.mark.slow

SEED = 2025  # the demo UNet's seed
STEPS = 6
ATOL, RTOL = 2e-5, 1e-4
GGUF_FORMATS = ("Q8_0", "Q4_0", "Q4_K")
FP8_FORMATS = ("fp8_e4m3fn", "fp8_e5m2", "scaled_fp8")
FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # what --fp16-unet / --bf16-unet (or a GPU) load


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    """Folders registered with ComfyUI (diffusion_models, loras), the float16 demo UNet, the LoRA pair."""
    import comfy.sd
    import folder_paths
    from klora_core.cli import demo_models

    unets, loras = tmp_path_factory.mktemp("unets"), tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("diffusion_models", str(unets), is_default=True)
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    sd = demo_models.make_unet_state_dict(SEED)
    float_model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    sd_s, truth_s = lora_factory.make_lora(float_model, "kohya", rank=8, alpha=4.0, seed=31)
    sd_t, truth_t = lora_factory.make_lora(float_model, "peft", rank=4, seed=32)
    lora_factory.save_lora(sd_s, loras / "subject.safetensors")
    lora_factory.save_lora(sd_t, loras / "style.safetensors")
    return {"unets": unets, "loras": loras, "sd": sd, "truth": (truth_s, truth_t), "written": {}}


def _gguf_file(files, qtype):
    gguf_pack.require()
    name = f"demo-{qtype}.gguf"
    if name not in files["written"]:
        rest = "F16" if qtype == "Q4_K" else "F32"  # Q4_K: a mixed file (F16 weights baked, Q4_K live)
        files["written"][name] = quantized_files.write_gguf(files["sd"], files["unets"] / name, qtype, rest=rest)
    return name


def _fp8_file(files, fmt):
    name = f"demo-{fmt}.safetensors"
    if name not in files["written"]:
        path = files["unets"] / name
        if fmt == "scaled_fp8":
            quantized_files.write_scaled_fp8(files["sd"], path)
        else:
            quantized_files.write_fp8(files["sd"], path, FP8_DTYPES[fmt])
        files["written"][name] = fmt
    return name


#: A weight every format quantizes (768 values per row: whole Q8_0/Q4_0/Q4_K blocks).
PROBE = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def load(files, fmt):
    """A fresh ModelPatcher of the demo UNet in format ``fmt``, through the loader a user would use."""
    import comfy.utils
    import nodes

    if fmt in GGUF_FORMATS:
        gguf_pack.require()
        loader = gguf_pack.load_in_process()["UnetLoaderGGUF"]
        model = loader().load_unet(_gguf_file(files, fmt))[0]
        stored = getattr(getattr(comfy.utils.get_attr(model.model, PROBE), "tensor_type", None), "name", None)
        assert stored == fmt, f"ComfyUI-GGUF holds {PROBE} as {stored}, not {fmt}"
        return model
    if fmt in HALF_DTYPES:
        import comfy.sd

        model = comfy.sd.load_diffusion_model_state_dict(dict(files["sd"]), model_options={"dtype": HALF_DTYPES[fmt]})
        assert comfy.utils.get_attr(model.model, PROBE).dtype == HALF_DTYPES[fmt]
        return model
    model = nodes.UNETLoader().load_unet(_fp8_file(files, fmt), "default" if fmt == "scaled_fp8" else fmt)[0]
    weight = comfy.utils.get_attr(model.model, PROBE)  # fp8 (0.3.75) or a quantized tensor class (0.8.0)
    assert "float8" in str(weight.dtype) or "Quantized" in type(weight).__name__, (type(weight), weight.dtype)
    return model


def reference_base(files, fmt):
    """``(patcher, storage_dtypes)`` for the brute-force reference: a second load of the same fp8/fp16 model, or for
    GGUF a float32 model (ComfyUI's stock loader) of the values ComfyUI-GGUF's layers compute with."""
    import comfy.sd

    if fmt not in GGUF_FORMATS:
        return load(files, fmt), {}
    name = _gguf_file(files, fmt)
    host = gguf_pack.host_dequantized(files["unets"] / name)
    independent = quantized_files.gguf_dequantized(files["unets"] / name)  # the gguf package, in float32
    for key, values in independent.items():  # the file holds what GGUF defines (to ComfyUI-GGUF's fp16 math)
        torch.testing.assert_close(host[key], values, rtol=2.0 ** -10, atol=2.0 ** -9 * float(values.abs().max()))
    patcher = comfy.sd.load_diffusion_model_state_dict(host)
    f16 = {"diffusion_model." + k: torch.float16 for k, t in files["written"][name].items() if t == "F16"}
    return patcher, f16


def handles(files, strengths=(1.0, 1.0)):
    from klora_pack.nodes.handles import make_handle

    return (make_handle("subject", "subject.safetensors", str(files["loras"] / "subject.safetensors"), strengths[0]),
            make_handle("style", "style.safetensors", str(files["loras"] / "style.safetensors"), strengths[1]))


@pytest.fixture(autouse=True)
def inference_mode():
    """ComfyUI runs every node (loaders, K-LoRA Fuse, samplers) under torch.inference_mode() (execution.py);
    its fp8 rounding and ComfyUI 0.8.0's quantized layers need it."""
    with torch.inference_mode():
        yield


def sample(model):
    return tiny_models.sample_once(model, "sd15", steps=STEPS, cfg=2.0, seed=3)


#: The report's mode line when auto picks bypass on a GGUF model.
GGUF_BYPASS_LINE = ("mode bypass: weights untouched, the chosen LoRA is added at forward time (auto: GGUF weights; "
                    "bypass adds the low-rank term at forward instead of ComfyUI-GGUF dequantizing and adding a "
                    "dense delta at every forward)")
GGUF_LIVE_LINE = "mode live: GGUF weights are patched at every forward by ComfyUI-GGUF, reading the current choice"

ALL_FORMATS = [pytest.param(f, id=f) for f in GGUF_FORMATS + FP8_FORMATS + tuple(HALF_DTYPES)]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_forced_subject_equals_lora_loader(klora_pack, files, fmt):
    import nodes
    from klora_pack.nodes.fuse import fuse_model

    model = load(files, fmt)
    before = sample(model)
    subject, style = handles(files)
    result = fuse_model(model, subject, style, alpha=0.0, beta=0.0, mode="bake")  # auto on GGUF: bypass (below)
    ours = sample(result.model)
    plain = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "subject.safetensors", 1.0)[0]
    assert torch.equal(ours, sample(plain))
    assert not torch.equal(ours, before)
    assert torch.equal(sample(model), before), "the base model changed after a K-LoRA run"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_default_run_equals_host_rounded_brute_force(klora_pack, files, fmt):
    import comfy.samplers
    from klora_pack.nodes.fuse import fuse_model

    model = load(files, fmt)
    before = sample(model)
    subject, style = handles(files, strengths=(0.9, 1.1))
    result = fuse_model(model, subject, style)
    ours = sample(result.model)

    ref_model, storage = reference_base(files, fmt)
    if fmt in GGUF_FORMATS:  # auto chose bypass: no weight is patched, so none is rounded to its storage dtype
        storage = {}
    sigmas = comfy.samplers.calculate_sigmas(ref_model.get_model_object("model_sampling"), "normal", STEPS)
    ref = quantized_reference.HostRoundedBruteForce("sd15", SEED, *files["truth"], strengths=(0.9, 1.1),
                                                    storage_dtypes=storage, patcher=ref_model, full_sigmas=sigmas)
    torch.testing.assert_close(ours, sample(ref.patcher), atol=ATOL, rtol=RTOL)
    assert {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log} == {True, False}
    assert result.run.flip_events > 0
    assert torch.equal(sample(model), before), "the base model changed after a K-LoRA run"

    live = result.run.host_live
    if fmt in GGUF_FORMATS:  # quantized weights (all of Q8_0/Q4_0, the 768-wide rows of Q4_K): auto is bypass
        assert result.run.mode == "bypass" and not live and result.run.rebaked == 0 and not result.model.patches
        assert GGUF_BYPASS_LINE in result.report, result.report
    else:  # fp8 / fp16 / bf16: baked, re-baked at flips, rounded as ComfyUI rounds (fp8: seeded, stochastic)
        assert result.run.mode == "bake" and not live and result.run.rebaked > 0
        assert "mode bake: a weight is re-baked when its choice flips (auto: ComfyUI's classic patcher" \
            in result.report, result.report


def test_gguf_shape_mismatch_names_the_logical_shape(klora_pack, files, tmp_path):
    """A LoRA for another model on a GGUF model: the message gives the real shape, not the packed bytes."""
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle
    from support import detectable_models

    model = load(files, "Q4_0")
    wrong = detectable_models.write_sd2_shaped_lora(tmp_path / "sd2.safetensors")
    subject, style = handles(files)
    with pytest.raises(KLoRAError) as exc:
        fuse_model(model, make_handle("subject", "sd2.safetensors", str(wrong), 1.0), style)
    message = str(exc.value)
    assert "LoRA delta 320x1024 does not fit the model weight of shape (320, 768) (GGUF Q4_0, packed as " \
           "320x432 bytes)" in message, message
    assert not model.patches and not model.weight_wrapper_patches


def _loha(float_model, path, seed=42):
    """A LoHa (rank 2 = its K's rank, alpha 2: scale 1) on every attention projection, kohya names, written to ``path``.

    Returns its truth for the brute force: ``{weight key: [(delta, identity, 1.0, None)]}``, the delta
    ``(w1_a @ w1_b) * (w2_a @ w2_b)`` written plainly (up @ down = delta @ I = delta)."""
    modules = lora_factory.lora_modules(float_model, "kohya", "attn")
    sd_model = float_model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    loha, truth = {}, {}
    for base in sorted(modules):
        key = modules[base][0]
        out_f, in_f = sd_model[key].shape
        parts = {part: torch.randn(shape, generator=gen) * 0.3 for part, shape in (
            ("hada_w1_a", (out_f, 2)), ("hada_w1_b", (2, in_f)), ("hada_w2_a", (out_f, 2)), ("hada_w2_b", (2, in_f)))}
        loha.update({f"{base}.{part}": t for part, t in parts.items()})
        loha[base + ".alpha"] = torch.tensor(2.0)
        delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        truth[key] = [(delta, torch.eye(in_f), 1.0, None)]
    lora_factory.save_lora(loha, path)
    return truth


def _dense_pair(float_model, folder):
    """A DoRA subject (delta depends on the base weight) and a LoHa style, kohya names, on every projection."""
    modules = lora_factory.lora_modules(float_model, "kohya", "attn")
    sd_model = float_model.model.state_dict()
    gen = torch.Generator().manual_seed(41)
    dora = {}
    for base in sorted(modules):
        out_f, in_f = sd_model[modules[base][0]].shape
        dora[base + ".lora_down.weight"] = torch.randn(4, in_f, generator=gen) * 0.1
        dora[base + ".lora_up.weight"] = torch.randn(out_f, 4, generator=gen) * 0.1
        dora[base + ".dora_scale"] = 1.0 + 0.1 * torch.rand(out_f, 1, generator=gen)
    lora_factory.save_lora(dora, folder / "dora.safetensors")
    _loha(float_model, folder / "loha.safetensors")
    return folder / "dora.safetensors", folder / "loha.safetensors"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_dense_deltas_use_the_dequantized_weight(klora_pack, files, tmp_path, qtype):
    """DoRA / LoHa deltas come from patching the dequantized weight: scores equal those on a float32 model
    of the same dequantized values (the packed bytes would give zero or wrong deltas)."""
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle
    from klora_pack.nodes.pair_scores import clear_score_cache

    ref_model, _ = reference_base(files, qtype)
    dora, loha = _dense_pair(ref_model, tmp_path)
    plans = []
    for model in (load(files, qtype), ref_model):
        clear_score_cache()  # the cache is keyed by file content, not by model
        plans.append(fuse_model(model, make_handle("subject", "dora", str(dora), 1.0),
                                make_handle("style", "loha", str(loha), 1.0)).plan)
    gguf_plan, float_plan = plans
    assert gguf_plan.scores.keys() == float_plan.scores.keys() and len(gguf_plan.scores) == 24
    for key, (ts, tt) in float_plan.scores.items():
        assert gguf_plan.scores[key] == pytest.approx((ts, tt), rel=1e-5), key
    assert gguf_plan.gamma == pytest.approx(float_plan.gamma, rel=1e-5)


def test_gguf_switches_stay_in_the_patch_list_in_live_mode(klora_pack, files):
    """ComfyUI-GGUF's layers ignore weight wrappers: even the weight-wrapper mode must patch GGUF weights
    through the patch list (same result as the default mode)."""
    from klora_pack.nodes.fuse import fuse_model

    model = load(files, "Q8_0")
    subject, style = handles(files)
    live = fuse_model(model, subject, style, mode="live")
    assert not live.model.weight_wrapper_patches
    assert torch.equal(sample(live.model), sample(fuse_model(model, subject, style, mode="bake").model))


def _brute_force(files, fmt, style_truth=None, style_rank=None):
    """The sampled brute-force reference of the default run on ``fmt`` (nothing rounded: GGUF F32 storage).

    ``style_truth`` / ``style_rank``: another style LoRA and the rank its K uses (a LoHa's inner dimension,
    which its ``delta @ I`` truth does not carry)."""
    import comfy.samplers
    from support import klora_reference

    ref_model, _ = reference_base(files, fmt)
    sigmas = comfy.samplers.calculate_sigmas(ref_model.get_model_object("model_sampling"), "normal", STEPS)
    truth_s, truth_t = files["truth"]
    ref = quantized_reference.HostRoundedBruteForce("sd15", SEED, truth_s, style_truth or truth_t,
                                                    patcher=ref_model, full_sigmas=sigmas)
    if style_rank is not None:
        plan = ref.plan
        ref.plan = klora_reference.reference_plan(ref.subject, ref.style, plan.alpha, plan.beta, plan.pattern,
                                                  style_rank=style_rank)
    expected = sample(ref.patcher)
    assert {ref.plan.uses_subject(u, p) for u in ref.plan.ts for p in ref.progress_log} == {True, False}
    return expected


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_forced_bake_on_gguf_is_patched_live_and_equals_brute_force(klora_pack, files, fmt):
    """Mode bake on a GGUF model (what auto chose before bypass): the switches stay in the patch list and
    ComfyUI-GGUF patches them at every forward, nothing re-baked; same reference as the default run."""
    from klora_pack.nodes.fuse import fuse_model

    model = load(files, fmt)
    before = sample(model)
    result = fuse_model(model, *handles(files), mode="bake")
    assert len(result.run.host_live) == len(result.plan.keys) and result.run.rebaked == 0
    assert f"{GGUF_LIVE_LINE} (nothing to re-bake) (chosen by the mode input)" in result.report, result.report
    torch.testing.assert_close(sample(result.model), _brute_force(files, fmt), atol=ATOL, rtol=RTOL)
    assert result.run.flip_events > 0
    assert torch.equal(sample(model), before), "the base model changed after a K-LoRA run"


def test_auto_on_gguf_with_a_loha_keeps_live_patching(klora_pack, files, tmp_path):
    """A LoHa has no low-rank forward form: auto on a GGUF model leaves the switches to ComfyUI-GGUF's live
    patching and the report says why; exact against the brute force with the LoHa delta written plainly."""
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    model = load(files, "Q8_0")
    before = sample(model)
    ref_model, _ = reference_base(files, "Q8_0")
    loha_truth = _loha(ref_model, tmp_path / "loha.safetensors")
    subject, _ = handles(files)
    result = fuse_model(model, subject, make_handle("style", "loha", str(tmp_path / "loha.safetensors"), 1.0))
    assert result.run.mode == "bake" and result.run.rebaked == 0 and not result.model.weight_wrapper_patches
    assert len(result.run.host_live) == len(result.plan.keys) == 24
    assert GGUF_LIVE_LINE in result.report and "(auto: GGUF weights, but style LoRA 'loha'" in result.report, result.report
    torch.testing.assert_close(sample(result.model), _brute_force(files, "Q8_0", loha_truth, style_rank=2), atol=ATOL, rtol=RTOL)
    assert result.run.flip_events > 0
    assert torch.equal(sample(model), before), "the base model changed after a K-LoRA run"
