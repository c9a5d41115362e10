# SPDX-License-Identifier: GPL-3.0-or-later
"""A test-only ComfyUI node: a tiny seeded model with its conditioning and an empty latent.

Linked into a test server's ``custom_nodes`` folder by tests that need a
model ComfyUI's stock loaders cannot build small (FLUX's loader fixes 24
heads of 128 channels), so the same tiny models as the in-process tests run
through the real server: ``KLoRATestTinyModel(family, seed)`` ->
``(MODEL, positive, negative, LATENT)`` from tests/support/tiny_models.py.
Never part of the node pack.
"""
from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))

from support import tiny_models  # noqa: E402


class KLoRATestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(tiny_models.FAMILIES),), "seed": ("INT", {"default": 0, "min": 0})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, seed):
        model = tiny_models.build_model(family, seed)
        positive, negative = tiny_models.make_conds(family, seed=seed)
        latent, _ = tiny_models.make_latent(family, seed=seed)
        return (model, positive, negative, {"samples": latent})


NODE_CLASS_MAPPINGS = {"KLoRATestTinyModel": KLoRATestTinyModel}
