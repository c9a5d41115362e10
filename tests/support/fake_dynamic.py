# SPDX-License-Identifier: GPL-3.0-or-later
"""A ModelPatcher presenting current ComfyUI's dynamic VRAM surface, for tests on ComfyUI versions without it.

Current ComfyUI (0.38, read from its ``comfy/model_patcher.py``) makes
``ModelPatcherDynamic`` the default patcher on NVIDIA.  What K-LoRA's mode
choice sees of it, and what this class reproduces:

- ``is_dynamic()`` returns True (classic ``ModelPatcher.is_dynamic()`` returns
  False there; 0.3.75 and 0.8.0 have no such method);
- ``get_non_dynamic_delegate()`` returns a classic (non-dynamic) ModelPatcher
  over a *reloaded* copy of the model carrying this patcher's patches and
  options, or raises ``RuntimeError("Cannot create non-dynamic delegate:
  cached_patcher_init is not initialized.")`` when the loader left nothing to
  reload from.  Calls are counted (``delegate_calls``): each one is a full
  model reload in current ComfyUI.
- clones keep the class (``clone()`` builds ``self.__class__``), so a clone of
  a dynamic patcher is dynamic.

Everything else is ComfyUI's real ModelPatcher: loading, patching, injections
and sampling run ComfyUI's own code on the CPU.

    source = make_dynamic("sd15", seed=0, delegate="reload")   # or delegate="error" / "dynamic"
"""
from __future__ import annotations

import functools

from support import tiny_models

DELEGATE_ERROR = "Cannot create non-dynamic delegate: cached_patcher_init is not initialized."


@functools.lru_cache(maxsize=None)
def _patcher_class():
    import comfy.model_patcher

    class FakeDynamicPatcher(comfy.model_patcher.ModelPatcher):
        """``is_dynamic()`` True; ``get_non_dynamic_delegate()`` per ``self.delegate_kind`` (see module docstring)."""

        family = "sd15"
        seed = 0
        delegate_kind = "reload"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.delegate_calls = 0

        def is_dynamic(self):
            return True

        def clone(self, *args, **kwargs):
            n = super().clone(*args, **kwargs)
            n.family, n.seed, n.delegate_kind = self.family, self.seed, self.delegate_kind
            return n

        def get_non_dynamic_delegate(self):
            import comfy.model_patcher

            self.delegate_calls += 1
            if self.delegate_kind == "error":
                raise RuntimeError(DELEGATE_ERROR)
            if self.delegate_kind == "dynamic":
                return self.clone()
            reloaded = tiny_models.build_model(self.family, self.seed)  # a reload: a second copy of the model
            n = comfy.model_patcher.ModelPatcher(reloaded.model, self.load_device, self.offload_device)
            n.patches = {k: v[:] for k, v in self.patches.items()}
            n.patches_uuid = self.patches_uuid
            n.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
            n.parent = self
            return n

    return FakeDynamicPatcher


def make_dynamic(family: str = "sd15", seed: int = 0, delegate: str = "reload"):
    """A fake dynamic patcher over a fresh tiny model of ``family`` (``delegate``: "reload", "error", "dynamic")."""
    base = tiny_models.build_model(family, seed)
    patcher = _patcher_class()(base.model, base.load_device, base.offload_device)
    patcher.family, patcher.seed, patcher.delegate_kind = family, seed, delegate
    return patcher
