"""Test-only ComfyUI nodes for running the family workflows on tiny models (never shipped with the pack).

tests/support/workflow_tools.py links this folder into the test server's
``custom_nodes`` as ``klora-test-nodes``.  Two stand-ins for parts of a
workflow that cannot be tiny:

- ``KLoRATestDiffusionModel``: loads a diffusion model file whose safetensors
  metadata names its ComfyUI config class and unet config
  (``klora_test_config_class``, ``klora_test_unet_config`` as JSON), the way
  ``comfy.sd.load_diffusion_model_state_dict`` loads a checkpoint once it
  knows the class.  Families whose detection in ``comfy/model_detection.py``
  fixes full-size widths (Qwen-Image: 24 heads x 128; Z-Image: 3840 wide)
  cannot be detected at a few MB, so their workflows' ``UNETLoader`` becomes
  this node in the test.
- ``KLoRATestConditioning``: seeded ``N(0, 1)`` text conditioning
  ``[1, tokens, width]``, standing in for ``CLIPLoader`` + ``CLIPTextEncode``:
  the families' text encoders (UMT5-XXL, Qwen2.5-VL 7B, Qwen3 4B) have fixed
  multi-GB configurations.
"""
from __future__ import annotations

import json

import torch


class KLoRATestDiffusionModel:
    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name):
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models
        import comfy.utils
        import folder_paths
        from safetensors import safe_open

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        config_class = getattr(comfy.supported_models, metadata["klora_test_config_class"])
        model_config = config_class(json.loads(metadata["klora_test_unet_config"]))
        model_config.set_inference_dtype(torch.float32, None)
        sd = model_config.process_unet_state_dict(comfy.utils.load_torch_file(path, safe_load=True))
        model = model_config.get_model(sd, "")
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{unet_name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        load_device = comfy.model_management.get_torch_device()
        offload_device = comfy.model_management.unet_offload_device()
        return (comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device),)


class KLoRATestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 6, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 32, "min": 1, "max": 8192}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens, width, seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return ([[torch.randn((1, tokens, width), generator=gen), {}]],)


NODE_CLASS_MAPPINGS = {"KLoRATestDiffusionModel": KLoRATestDiffusionModel,
                       "KLoRATestConditioning": KLoRATestConditioning}
