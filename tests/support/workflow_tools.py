"""Shared pieces of the "See the fusion" tests (preview route, example workflows, browser).

- :func:`live_server`: ONE real ComfyUI server (tests/server_harness.py) per
  pytest session for test_preview_route.py, test_workflows.py and
  test_browser.py, with the small detectable models (tests/detectable_models.py),
  a checkpoint assembled from them, an input image, and the test-only nodes of
  tests/support/comfy_test_nodes (for the model-family workflows).  Started on first use,
  stopped at the end of the session.
- The example workflows (workflows/*.json, workflows/api/*.json), their
  validation against a running server's /object_info (:func:`validate_ui`,
  :func:`ui_widget_values`), the API prompt the frontend makes of a UI file
  (:func:`ui_to_api`) and their adaptation to the small models
  (:func:`adapt_api`, :func:`adapt_ui`).  The loaders take a folder, so the
  copies saved with 0.1.0 (tests/fixtures/workflows-0.1.0) are read the same way.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
WORKFLOW_NAMES = ("klora_sdxl_subject_style", "klora_flux_s_star", "klora_sd15", "klora_img2img")
#: Model-family workflows, run on tiny models of their own family (support/family_workflows.py).
FAMILY_WORKFLOW_NAMES = ("klora_wan_t2v", "klora_qwen_image", "klora_z_image")
ALL_WORKFLOW_NAMES = WORKFLOW_NAMES + FAMILY_WORKFLOW_NAMES

#: Node types that exist only in the frontend (never in /object_info, never executed).
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
#: Combo inputs that name files on the user's disk: substituted with the generated models.
FILE_INPUTS = {"ckpt_name": "checkpoint", "unet_name": "unet", "clip_name": "clip", "clip_name1": "clip",
               "clip_name2": "clip", "vae_name": "vae", "image": "image"}
LORA_ROLE = {"KLoRASubjectLoader": "subject", "KLoRAStyleLoader": "style"}
#: Test sizes: an 8x8 latent and 3 steps keep a run of the demo UNet around a second on a CPU.
SMALL_PIXELS = 64
SMALL_STEPS = 3
INPUT_IMAGE = "example.png"


# --------------------------------------------------------------------------- the shared server


@dataclass
class Live:
    server: object  # server_harness.ComfyServer
    names: dict  # role -> file name as ComfyUI lists it: unet, clip, vae, subject, style, checkpoint, image
    object_info: dict


_LIVE: Live | None = None


def demo_checkpoint(server, names: dict) -> str:
    """A single-file SD1.5 checkpoint (``CheckpointLoaderSimple``) from the generated UNet, CLIP-L and VAE.

    The example workflows load a checkpoint; the detectable parts become one by
    prefixing their keys as SD1.x checkpoints do (``model.diffusion_model.``,
    ``cond_stage_model.transformer.``, ``first_stage_model.``).  Written once
    into the demo-model cache (its name carries the parts' names, which carry
    their version and seed) and linked into the server's checkpoints folder.
    """
    from safetensors.torch import load_file, save_file

    from klora_core.cli import demo_models

    cache = demo_models.default_cache_dir()
    stem = names["unet"].replace("-unet-", "-checkpoint-")
    if stem == names["unet"]:
        stem = "klora-demo-checkpoint-" + names["unet"]
    target = cache / stem
    if not target.is_file():
        parts = {"model.diffusion_model.": server.unet_dir / names["unet"],
                 "cond_stage_model.transformer.": server.clip_dir / names["clip"],
                 "first_stage_model.": server.vae_dir / names["vae"]}
        state = {}
        for prefix, path in parts.items():
            for key, tensor in load_file(str(path)).items():
                state[prefix + key] = tensor
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
        save_file(state, str(tmp))
        os.replace(tmp, target)
    link = server.checkpoints_dir / target.name
    if not link.exists():
        try:
            os.symlink(target, link)
        except OSError:
            import shutil

            shutil.copyfile(target, link)
    return target.name


def write_input_image(server) -> str:
    """An RGB picture in the server's input folder for LoadImage."""
    from PIL import Image

    path = Path(server.input_dir) / INPUT_IMAGE
    if not path.exists():
        image = Image.new("RGB", (96, 80))
        image.putdata([((x * 5) % 256, (y * 7) % 256, ((x + y) * 3) % 256) for y in range(80) for x in range(96)])
        image.save(path)
    return INPUT_IMAGE


def live_server(request) -> Live:
    """The session's shared server (started on first call; stopped when the session ends)."""
    global _LIVE
    if _LIVE is None:
        from support import detectable_models, family_workflows
        from support.server_harness import ComfyServer

        server = ComfyServer()
        family_workflows.link_test_nodes(server)
        server.__enter__()
        try:
            names = dict(detectable_models.write_all(server))
            names["checkpoint"] = demo_checkpoint(server, names)
            names["image"] = write_input_image(server)
            info = server.object_info()
        except BaseException:
            server.__exit__(None, None, None)
            raise
        _LIVE = Live(server, names, info)

        def stop():
            global _LIVE
            live, _LIVE = _LIVE, None
            if live is not None:
                live.server.__exit__(None, None, None)

        request.session.config.add_cleanup(stop)
    return _LIVE


# --------------------------------------------------------------------------- workflows


def load_ui(name: str, folder: Path = WORKFLOWS_DIR) -> dict:
    return json.loads((Path(folder) / f"{name}.json").read_text(encoding="utf-8"))


def load_api(name: str, folder: Path = WORKFLOWS_DIR) -> dict:
    return json.loads((Path(folder) / "api" / f"{name}.json").read_text(encoding="utf-8"))


def widget_specs(node_def: dict) -> list:
    """``[(name, kind, options)]`` of the widgets the frontend creates for a node, in order.

    kind: COMBO (options["choices"]), INT, FLOAT, STRING, BOOLEAN, or the
    frontend-only values CONTROL (after a seed with control_after_generate)
    and UPLOAD (after an image_upload combo), which are in widgets_values but
    never in the API format.
    """
    specs = []
    order = node_def.get("input_order") or {k: list(v) for k, v in node_def.get("input", {}).items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = node_def["input"][section][name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(kind, list):
                specs.append((name, "COMBO", {**opts, "choices": kind}))
            elif kind == "COMBO":
                specs.append((name, "COMBO", {**opts, "choices": opts.get("options", [])}))
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                specs.append((name, kind, opts))
            else:
                continue  # a socket
            if kind == "INT" and opts.get("control_after_generate"):
                specs.append(("#control", "CONTROL", {}))
            if opts.get("image_upload"):
                specs.append(("#upload", "UPLOAD", {}))
    return specs


def socket_type(node_def: dict, input_name: str):
    for section in ("required", "optional"):
        spec = node_def.get("input", {}).get(section, {}).get(input_name)
        if spec is not None:
            return "COMBO" if isinstance(spec[0], list) else spec[0]
    return None


def substitute(node_type: str, input_name: str, value, names: dict):
    """The generated file's name for a file-naming input, else ``value``."""
    if input_name == "lora_name" and node_type in LORA_ROLE:
        return names[LORA_ROLE[node_type]]
    if input_name in FILE_INPUTS:
        return names[FILE_INPUTS[input_name]]
    return value


def check_value(where: str, kind: str, opts: dict, value) -> list:
    problems = []
    if kind == "COMBO":
        if value not in opts["choices"]:
            problems.append(f"{where}: {value!r} is not one of {opts['choices'][:12]}")
    elif kind in ("INT", "FLOAT"):
        ok_type = isinstance(value, int) if kind == "INT" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            problems.append(f"{where}: {value!r} is not a finite {kind}")
        else:
            lo, hi = opts.get("min", -math.inf), opts.get("max", math.inf)
            if not lo <= value <= hi:
                problems.append(f"{where}: {value!r} is outside [{lo}, {hi}]")
    elif kind == "STRING":
        if not isinstance(value, str):
            problems.append(f"{where}: {value!r} is not a string")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not a boolean")
    elif kind == "CONTROL":
        if value not in CONTROL_VALUES:
            problems.append(f"{where}: control value {value!r} is not one of {CONTROL_VALUES}")
    elif kind == "UPLOAD":
        if value != "image":
            problems.append(f"{where}: upload widget value {value!r} (expected 'image')")
    return problems


def ui_widget_values(node: dict, node_def: dict) -> dict:
    """``{input name: value}`` of a UI node's widgets_values (frontend-only values dropped)."""
    specs = widget_specs(node_def)
    values = node.get("widgets_values") or []
    return {name: value for (name, kind, _), value in zip(specs, values) if kind not in ("CONTROL", "UPLOAD")}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend queues for a UI workflow under the server's current node definitions.

    Widget values are assigned by position to the widgets the current
    definition creates (as the frontend does when it loads a saved graph), and
    every link becomes ``[origin node id, origin slot]``.  (No ``_meta``
    titles: they are labels, compare with :func:`without_meta`.)
    """
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs = ui_widget_values(node, object_info[node["type"]])
        for link_id, origin, o_slot, target, _t_slot, _type in workflow.get("links") or []:
            if target == node["id"]:
                input_name = next(i["name"] for i in node["inputs"] if i["link"] == link_id)
                inputs[input_name] = [str(origin), o_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def without_meta(prompt: dict) -> dict:
    """An API prompt without the frontend's ``_meta`` labels: what the server executes."""
    return {node_id: {k: v for k, v in entry.items() if k != "_meta"} for node_id, entry in prompt.items()}


def validate_ui(workflow: dict, object_info: dict, names: dict, saved_earlier: bool = False) -> list:
    """Every problem that would stop the 0.3.75 frontend/server from using this UI workflow.

    ``saved_earlier``: the file was saved by an earlier version of the nodes, so
    widgets added since then may have no value yet, provided they come last and
    are optional with a default (the frontend gives them their default on load).
    """
    problems = []
    if workflow.get("version") != 0.4:
        problems.append(f"version is {workflow.get('version')!r}, expected 0.4")
    nodes = workflow.get("nodes") or []
    by_id = {}
    for node in nodes:
        node_id = node.get("id")
        if not isinstance(node_id, int) or isinstance(node_id, bool) or node_id < 1:
            problems.append(f"node id {node_id!r} is not a positive integer")
        if node_id in by_id:
            problems.append(f"node id {node_id} is used twice")
        by_id[node_id] = node
        for field in ("type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                      "widgets_values"):
            if field not in node:
                problems.append(f"node {node_id}: no {field!r}")
    if by_id and workflow.get("last_node_id", -1) < max(by_id):
        problems.append(f"last_node_id {workflow.get('last_node_id')} < largest node id {max(by_id)}")
    orders = [n.get("order") for n in nodes]
    if sorted(orders) != list(range(len(nodes))):
        problems.append(f"node 'order' values are not 0..{len(nodes) - 1}: {orders}")

    links = workflow.get("links") or []
    link_ids = [link[0] for link in links]
    if len(set(link_ids)) != len(link_ids):
        problems.append("a link id is used twice")
    if links and workflow.get("last_link_id", -1) < max(link_ids):
        problems.append(f"last_link_id {workflow.get('last_link_id')} < largest link id {max(link_ids)}")

    for node in nodes:
        node_type, node_id = node.get("type"), node.get("id")
        where = f"node {node_id} ({node_type})"
        if node_type in FRONTEND_ONLY:
            if node_type in ("Note", "MarkdownNote"):
                text = (node.get("widgets_values") or [""])[0]
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{where}: empty note")
            continue
        node_def = object_info.get(node_type)
        if node_def is None:
            problems.append(f"{where}: node type not in /object_info")
            continue
        # outputs as the server defines them
        for slot, out in enumerate(node.get("outputs") or []):
            if slot >= len(node_def["output"]):
                problems.append(f"{where}: output {slot} does not exist")
            elif out.get("type") != node_def["output"][slot]:
                problems.append(f"{where}: output {slot} type {out.get('type')} != {node_def['output'][slot]}")
        # socket inputs
        for inp in node.get("inputs") or []:
            declared = socket_type(node_def, inp.get("name"))
            if declared is None:
                problems.append(f"{where}: input {inp.get('name')!r} is not an input of {node_type}")
            elif inp.get("type") != declared and declared != "*":
                problems.append(f"{where}: input {inp['name']} type {inp.get('type')} != {declared}")
        linked = {inp["name"] for inp in node.get("inputs") or [] if inp.get("link") is not None}
        specs = widget_specs(node_def)
        widget_names = {s[0] for s in specs}
        for name, spec in node_def["input"].get("required", {}).items():
            is_socket = not isinstance(spec[0], list) and spec[0] not in ("INT", "FLOAT", "STRING", "BOOLEAN",
                                                                           "COMBO")
            if is_socket and name not in linked and name not in widget_names:
                problems.append(f"{where}: required input {name!r} is not connected")
        values = node.get("widgets_values") or []
        optional = node_def["input"].get("optional", {})
        added_later = saved_earlier and all(name in optional and "default" in opts
                                            for name, _kind, opts in specs[len(values):])
        if len(values) > len(specs) or (len(values) < len(specs) and not added_later):
            problems.append(f"{where}: {len(values)} widget values for {len(specs)} widgets "
                            f"{[s[0] for s in specs]}")
        for (name, kind, opts), value in zip(specs, values):
            if kind == "COMBO" and (name in FILE_INPUTS or (name == "lora_name" and node_type in LORA_ROLE)):
                if not isinstance(value, str) or not value:
                    problems.append(f"{where}: {name} must name a file, got {value!r}")
                value = substitute(node_type, name, value, names)
            problems += check_value(f"{where}.{name}", kind, opts, value)

    for link in links:
        if len(link) != 6:
            problems.append(f"link {link}: expected [id, origin, origin_slot, target, target_slot, type]")
            continue
        link_id, origin, o_slot, target, t_slot, link_type = link
        src, dst = by_id.get(origin), by_id.get(target)
        if src is None or dst is None:
            problems.append(f"link {link_id}: node {origin if src is None else target} does not exist")
            continue
        outs, ins = src.get("outputs") or [], dst.get("inputs") or []
        if not 0 <= o_slot < len(outs) or not 0 <= t_slot < len(ins):
            problems.append(f"link {link_id}: slot out of range ({o_slot} of {len(outs)}, {t_slot} of {len(ins)})")
            continue
        out, inp = outs[o_slot], ins[t_slot]
        if link_id not in (out.get("links") or []):
            problems.append(f"link {link_id}: not listed in node {origin} output {o_slot}")
        if inp.get("link") != link_id:
            problems.append(f"link {link_id}: node {target} input {inp.get('name')} holds link {inp.get('link')}")
        src_def = object_info.get(src["type"])
        dst_def = object_info.get(dst["type"])
        real_out = src_def["output"][o_slot] if src_def and o_slot < len(src_def["output"]) else out.get("type")
        real_in = socket_type(dst_def, inp.get("name")) if dst_def else inp.get("type")
        if link_type != real_out:
            problems.append(f"link {link_id}: type {link_type} but node {origin} output {o_slot} is {real_out}")
        if real_in not in (real_out, "*"):
            problems.append(f"link {link_id}: {src['type']}.{out.get('name')} ({real_out}) -> "
                            f"{dst['type']}.{inp.get('name')} ({real_in})")
    return problems


def adapt_ui(workflow: dict, names: dict, object_info: dict) -> dict:
    """A copy with generated file names and test sizes (64 px images, 3 steps); structure unchanged."""
    out = copy.deepcopy(workflow)
    for node in out["nodes"]:
        node_def = object_info.get(node["type"])
        if node_def is None:
            continue
        specs = widget_specs(node_def)
        values = node.get("widgets_values") or []
        for index, (name, kind, _opts) in enumerate(specs[: len(values)]):
            value = substitute(node["type"], name, values[index], names) if kind == "COMBO" else values[index]
            if name in ("width", "height"):
                value = SMALL_PIXELS
            elif name == "steps":
                value = SMALL_STEPS
            values[index] = value
    return out


def adapt_api(prompt: dict, names: dict) -> dict:
    """A copy of an API prompt that runs on the small detectable SD1.5 models.

    File names become the generated ones; image sizes 64 px; steps 3.  Where a
    workflow needs model files no small detectable model exists for (FLUX:
    ``DualCLIPLoader`` of CLIP-L + T5, 16-channel ``EmptySD3LatentImage``),
    the node becomes its SD1.5 counterpart with the same output
    (``CLIPLoader``, ``EmptyLatentImage``); every other node runs as written.
    """
    out = copy.deepcopy(prompt)
    for node in out.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": names["clip"], "type": "stable_diffusion",
                              **({"device": inputs["device"]} if "device" in inputs else {})}
            continue
        if cls == "EmptySD3LatentImage":
            node["class_type"] = "EmptyLatentImage"
        for name, value in list(inputs.items()):
            if isinstance(value, list):
                continue  # a link
            if name == "lora_name" and cls in LORA_ROLE:
                inputs[name] = names[LORA_ROLE[cls]]
            elif name in FILE_INPUTS:
                inputs[name] = names[FILE_INPUTS[name]]
            elif name in ("width", "height"):
                inputs[name] = SMALL_PIXELS
            elif name == "steps":
                inputs[name] = SMALL_STEPS
    return out
