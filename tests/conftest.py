"""Shared pytest fixtures.

Tests that need ComfyUI use the ``comfy`` fixture (directly or through the
model fixtures). When ComfyUI cannot be imported those tests ERROR with a
message pointing at scripts/setup_comfyui_env.sh; nothing is skipped
silently. Importing this file never imports ComfyUI, so tests that only need
``klora_core`` run without it.

Every test that reaches ComfyUI carries the marker ``comfyui``: added here to
each test that uses the ``comfy`` fixture (directly or through another
fixture) or is marked ``server``; tests that reach ComfyUI another way (a
subprocess, ``comfy_env.find_comfy_root``) mark themselves.  scripts/test.sh
runs ``-m comfyui`` again on the second tested ComfyUI; a test that asks
``support.comfy_env`` for ComfyUI without the marker fails, so none is missed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# ``import klora_core`` for pure-torch tests. Appended, never prepended: the
# repository's ``nodes/`` must not shadow ComfyUI's ``nodes.py`` (setup_comfy
# puts ComfyUI's root first anyway).
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from support import comfy_env  # noqa: E402  (tests/ is on the path: pyproject.toml's pytest pythonpath; imports no ComfyUI)


def pytest_configure(config):
    """Run torch single-threaded unless KLORA_TEST_THREADS says otherwise.

    The test models are tiny: intra-op threads buy nothing, and on a shared
    machine (parallel test runs) OpenMP spin-waiting made tiny-UNet sampling
    many times slower (figures: bench/README.md, "The test models").
    """
    torch.set_num_threads(int(os.environ.get("KLORA_TEST_THREADS", "1")))


def pytest_report_header(config):
    """Which ComfyUI this run tests (scripts/test.sh runs the suite once per version)."""
    try:
        root = comfy_env.find_comfy_root()
    except comfy_env.ComfyEnvError as exc:
        return f"ComfyUI: not found ({exc})"
    try:
        version = comfy_env.comfy_version(root)
    except (OSError, AttributeError):  # a checkout without comfyui_version.py (older ComfyUI)
        version = "version unknown"
    return f"ComfyUI: {version} at {root}; python {sys.executable}"


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses the ``comfy`` fixture or starts a server ``comfyui``."""
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()) or item.get_closest_marker("server") is not None:
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(autouse=True)
def _comfyui_marker_guard(request):
    """Fail a test that asks for ComfyUI (``support.comfy_env``) without the ``comfyui`` marker."""
    before = comfy_env.lookups
    yield
    if comfy_env.lookups != before and request.node.get_closest_marker("comfyui") is None:
        pytest.fail(f"{request.node.nodeid} reaches ComfyUI but is not marked 'comfyui': use the comfy fixture "
                    "or add @pytest.mark.comfyui, so that scripts/test.sh also runs it on the second ComfyUI",
                    pytrace=False)


@pytest.fixture(scope="session")
def comfy() -> Path:
    """ComfyUI imported in-process (CPU); the value is its root path."""
    try:
        return comfy_env.setup_comfy()
    except comfy_env.ComfyEnvError as exc:
        message = str(exc)
    # Outside the except block, so the report shows the message once.
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def klora_pack(comfy):
    """This repository imported as package ``klora_pack`` (runs its __init__.py)."""
    return comfy_env.load_pack()


@pytest.fixture(scope="session")
def lora_keys(comfy):
    """The product module ``klora_pack.nodes.comfy_key_map`` (pack imported bare if not yet loaded)."""
    return comfy_env.import_pack_module("nodes.comfy_key_map")


@pytest.fixture
def sd15_model(comfy):
    """Fresh tiny SD1.5-shaped ModelPatcher, weights seeded with 0."""
    from support import tiny_models

    return tiny_models.build_model("sd15", seed=0)


@pytest.fixture
def sdxl_model(comfy):
    """Fresh tiny SDXL-shaped ModelPatcher, weights seeded with 0."""
    from support import tiny_models

    return tiny_models.build_model("sdxl", seed=0)


@pytest.fixture
def flux_model(comfy):
    """Fresh tiny FLUX-shaped ModelPatcher, weights seeded with 0."""
    from support import tiny_models

    return tiny_models.build_model("flux", seed=0)


@pytest.fixture
def tiny_model_builder(comfy):
    """``build(family, seed=0)`` -> fresh tiny ModelPatcher (for parametrised tests)."""
    from support import tiny_models

    return tiny_models.build_model


@pytest.fixture(scope="session")
def lora_factory(comfy):
    """The tests/lora_factory.py module (make_lora, expected_weight, save_lora, ...)."""
    from support import lora_factory as factory

    return factory


@pytest.fixture
def tmp_loras_dir(tmp_path) -> Path:
    """An empty folder for LoRA files written by a test."""
    d = tmp_path / "loras"
    d.mkdir()
    return d
