"""Test helpers shared by the test modules: ComfyUI import, tiny models, LoRA files, references, servers.

Imported as ``from support import tiny_models`` (pyproject.toml's pytest
``pythonpath`` puts ``tests/`` on the path). Nothing here imports ComfyUI at
import time except through :func:`support.comfy_env.setup_comfy`.
"""
