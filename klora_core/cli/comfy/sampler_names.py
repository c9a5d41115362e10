# SPDX-License-Identifier: GPL-3.0-or-later
"""KSampler's sampler and scheduler names, read from a ComfyUI folder without starting or importing it.

``python -m klora_core run --sampler eulr`` should fail in a second, not after
ComfyUI started and validated the prompt.  ComfyUI defines the names as
literals in ``comfy/samplers.py`` (0.3.x to current master):
``KSAMPLER_NAMES = [...]``, ``SAMPLER_NAMES = KSAMPLER_NAMES + [...]`` and
``SCHEDULER_HANDLERS = {"name": ..., ...}`` (older releases:
``SCHEDULER_NAMES = [...]``).  This module reads them with :mod:`ast`, never
executing the file.

"Where possible": custom node packs may add samplers or schedulers at run
time, and a future ComfyUI may build the lists differently.  So a name is only
called unknown when the lists were found AND no other custom node pack is
installed in that ComfyUI; otherwise the server's own validation decides
(reported as one line by :func:`klora_core.cli.comfy.client.describe_rejection`).
"""
from __future__ import annotations

import ast
import difflib
from pathlib import Path
from typing import Optional

#: Entries of ComfyUI's custom_nodes folder that are not node packs.
_NOT_PACKS = {"__pycache__", "example_node.py.example", "websocket_image_save.py"}


def _strings(node) -> Optional[list]:
    """The string literals of a list/tuple literal, ``NAME + [...]`` sums resolved by the caller; else None."""
    if isinstance(node, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                                       for e in node.elts):
        return [e.value for e in node.elts]
    return None


def _value(node, known: dict) -> Optional[list]:
    """Names a module-level assignment defines: a list literal, a sum of known names and list literals,
    ``list(DICT)`` of a known dict, or a dict literal's string keys."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _value(node.left, known), _value(node.right, known)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.Name):
        return known.get(node.id)
    if isinstance(node, ast.Dict):
        keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        return keys if len(keys) == len(node.keys) else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list"
            and len(node.args) == 1):
        return _value(node.args[0], known)
    return _strings(node)


def read_names(comfy_root) -> Optional[dict]:
    """``{"sampler": [...], "scheduler": [...]}`` as ``comfy/samplers.py`` defines them, or None."""
    try:
        tree = ast.parse(Path(comfy_root, "comfy", "samplers.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    known: dict = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _value(stmt.value, known)
            if value is not None:
                known[stmt.targets[0].id] = value
    samplers, schedulers = known.get("SAMPLER_NAMES"), known.get("SCHEDULER_NAMES")
    if not samplers or not schedulers:
        return None
    return {"sampler": samplers, "scheduler": schedulers}


def other_packs(comfy_root, own: str) -> list:
    """Custom node packs in ``comfy_root/custom_nodes`` other than ``own`` (they may add names)."""
    folder = Path(comfy_root, "custom_nodes")
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError:
        return []
    return [n for n in entries if n not in _NOT_PACKS and n != own and not n.startswith(".")
            and (n.endswith(".py") or Path(folder, n).is_dir())]


def unknown_name_message(comfy_root, kind: str, value: str, own_pack: str) -> Optional[str]:
    """A one-line usage error when ``value`` is certainly not a ``kind`` ("sampler"/"scheduler") of that
    ComfyUI; None when it is one, or when that cannot be known before the server runs."""
    names = read_names(comfy_root)
    if names is None or value in names[kind] or other_packs(comfy_root, own_pack):
        return None
    close = difflib.get_close_matches(value, names[kind], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return (f"--{kind} {value!r} is not a KSampler {kind} of this ComfyUI{hint} "
            f"(known: {', '.join(names[kind])})")
