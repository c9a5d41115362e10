# SPDX-License-Identifier: GPL-3.0-or-later
"""The three nodes' V3 schemas keep the contract of 0.1.0, and every input and output explains itself.

The contract (node ids, socket and widget names in order, output types and
names in order) is written out here as 0.1.0 defined it; saved workflows
depend on every part of it (tests/test_saved_workflows.py runs them on a real
server).  In-process: the pack as ComfyUI's loader registers it
(``comfy_entrypoint`` -> ``get_node_list``), read through ComfyUI's own V1
view of a V3 node (``INPUT_TYPES``, ``RETURN_TYPES``: what /object_info sends).
"""
from __future__ import annotations

import asyncio
import json

import pytest

from support import comfy_env

#: node id -> (display name, [(input, type, section)], [(output type, output name)]) as 0.1.0 had them.
CONTRACT_0_1_0 = {
    "KLoRASubjectLoader": ("Load Subject LoRA",
                           [("lora_name", "COMBO", "required"), ("strength", "FLOAT", "required"),
                            ("clip", "CLIP", "optional"), ("strength_clip", "FLOAT", "optional")],
                           [("KLORA_SUBJECT", "subject"), ("CLIP", "clip")]),
    "KLoRAStyleLoader": ("Load Style LoRA",
                         [("lora_name", "COMBO", "required"), ("strength", "FLOAT", "required"),
                          ("clip", "CLIP", "optional"), ("strength_clip", "FLOAT", "optional")],
                         [("KLORA_STYLE", "style"), ("CLIP", "clip")]),
    "KLoRAFuse": ("K-LoRA Fuse",
                  [("model", "MODEL", "required"), ("subject", "KLORA_SUBJECT", "required"),
                   ("style", "KLORA_STYLE", "required"), ("pattern", "COMBO", "required"),
                   ("alpha", "FLOAT", "required"), ("beta", "FLOAT", "required"), ("scope", "COMBO", "required"),
                   ("outside_scope", "COMBO", "required"), ("progress_measure", "COMBO", "required"),
                   ("map_steps", "INT", "optional")],
                  [("MODEL", "model"), ("STRING", "report"), ("IMAGE", "selection_map")]),
}


@pytest.fixture(scope="module")
def registered(klora_pack):
    """``{node id: node class}`` exactly as ComfyUI's custom-node loader gets them from the pack."""
    assert not hasattr(klora_pack, "NODE_CLASS_MAPPINGS"), "a V1 mapping would make ComfyUI ignore comfy_entrypoint"
    extension = asyncio.run(klora_pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    return {node.GET_SCHEMA().node_id: node for node in nodes}


def _inputs(node_cls) -> list:
    """``[(name, type, section, options)]`` in the order the frontend creates sockets and widgets."""
    spec = node_cls.INPUT_TYPES()
    return [(name, kind if isinstance(kind, str) else "COMBO", section, opts)
            for section in ("required", "optional") for name, (kind, opts) in spec.get(section, {}).items()]


@pytest.mark.parametrize("node_id", sorted(CONTRACT_0_1_0))
def test_schema_keeps_the_0_1_0_contract(registered, node_id):
    display, inputs, outputs = CONTRACT_0_1_0[node_id]
    node = registered[node_id]
    assert node.GET_SCHEMA().display_name == display
    assert [(name, kind, section) for name, kind, section, _ in _inputs(node)][: len(inputs)] == inputs
    added = _inputs(node)[len(inputs):]
    assert all(section == "optional" and "default" in opts for _, _, section, opts in added), (
        "inputs added after 0.1.0 must come last, optional, with a default: saved workflows lack them")
    assert list(zip(node.RETURN_TYPES, node.RETURN_NAMES)) == outputs


@pytest.mark.parametrize("node_id", sorted(CONTRACT_0_1_0))
def test_every_input_and_output_has_a_tooltip(registered, node_id):
    node = registered[node_id]
    missing = [name for name, _, _, opts in _inputs(node) if not opts.get("tooltip")]
    missing += [f"output {name}" for name, tip in zip(node.RETURN_NAMES, node.OUTPUT_TOOLTIPS) if not tip]
    assert not missing, missing
    assert node.GET_SCHEMA().description


def test_short_labels_are_the_schema_display_names(registered):
    """locales/en/nodeDefs.json (which the frontend reads for widget labels) says what the schemas say."""
    labels = json.loads((comfy_env.REPO_ROOT / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    from_schema = {}
    for node_id, node in registered.items():
        named = {i.id: {"name": i.display_name} for i in node.GET_SCHEMA().inputs if i.display_name}
        if named:
            from_schema[node_id] = {"inputs": named}
    assert labels == from_schema
    assert from_schema["KLoRAFuse"]["inputs"]["progress_measure"] == {"name": "progress"}


def test_fingerprint_follows_the_file(registered, tmp_path):
    """fingerprint_inputs (V1's IS_CHANGED) changes when the chosen file is rewritten, not otherwise."""
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(tmp_path))
    path = tmp_path / "fingerprinted.safetensors"
    path.write_bytes(b"one")
    loader = registered["KLoRASubjectLoader"]
    first = loader.fingerprint_inputs(lora_name=path.name, strength=1.0)
    assert loader.fingerprint_inputs(lora_name=path.name, strength=0.5) == first
    path.write_bytes(b"two")
    assert loader.fingerprint_inputs(lora_name=path.name, strength=1.0) != first
