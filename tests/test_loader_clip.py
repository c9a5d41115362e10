"""The loaders' optional CLIP input applies the file's text-encoder part exactly as LoraLoader does."""
from __future__ import annotations

import torch

from support import lora_factory


def _te_lora(seed: int = 3, rank: int = 4) -> dict:
    """Kohya text-encoder tensors for CLIP-L layers 0-1 (q, k, v, out, fc1, fc2)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"self_attn_q_proj": (768, 768), "self_attn_k_proj": (768, 768), "self_attn_v_proj": (768, 768),
              "self_attn_out_proj": (768, 768), "mlp_fc1": (3072, 768), "mlp_fc2": (768, 3072)}
    sd = {}
    for layer in (0, 1):
        for name, (out_f, in_f) in sorted(shapes.items()):
            base = f"lora_te_text_model_encoder_layers_{layer}_{name}"
            sd[base + ".lora_down.weight"] = torch.randn((rank, in_f), generator=gen) * 0.05
            sd[base + ".lora_up.weight"] = torch.randn((out_f, rank), generator=gen) * 0.05
            sd[base + ".alpha"] = torch.tensor(2.0)
    return sd


def test_clip_part_matches_lora_loader(klora_pack, tmp_path):
    import comfy.sd
    import folder_paths
    from klora_pack.klora_core.cli import demo_models
    from klora_pack.nodes.lora_loaders import KLoRAStyleLoader, KLoRASubjectLoader

    clip_path = demo_models.ensure_file("clip", demo_models.default_cache_dir())
    clip = comfy.sd.load_clip(ckpt_paths=[str(clip_path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    subject_unet, _ = demo_models.make_lora_pair()
    mixed = dict(subject_unet, **_te_lora())
    loras = tmp_path / "loras"
    loras.mkdir()
    lora_factory.save_lora(mixed, loras / "with_te.safetensors")
    folder_paths.add_model_folder_path("loras", str(loras))

    handle, ours = KLoRASubjectLoader.execute("with_te.safetensors", 1.0, clip=clip, strength_clip=0.7).args
    reference = comfy.sd.load_lora_for_models(None, clip, mixed, 0.0, 0.7)[1]
    assert handle.role == "subject" and set(handle.state_dict) == set(mixed)
    assert ours is not clip and len(ours.patcher.patches) == 12
    assert set(ours.patcher.patches) == set(reference.patcher.patches)

    tokens = clip.tokenize("a photo of sks dog, watercolor")
    cond_ours, pooled_ours = ours.encode_from_tokens(tokens, return_pooled=True)
    cond_ref, pooled_ref = reference.encode_from_tokens(tokens, return_pooled=True)
    cond_plain, _ = clip.encode_from_tokens(tokens, return_pooled=True)
    assert torch.equal(cond_ours, cond_ref) and torch.equal(pooled_ours, pooled_ref)
    assert not torch.allclose(cond_ours, cond_plain)  # the text-encoder part really changed the encoding

    style, no_clip = KLoRAStyleLoader.execute("with_te.safetensors", 1.0).args
    assert style.role == "style" and no_clip is None
