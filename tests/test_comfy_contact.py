# SPDX-License-Identifier: GPL-3.0-or-later
"""ComfyUI internals are read in one module each, so a ComfyUI change has one place to fix.

Read from the source (no import): in ``nodes/``, no attribute starting with
an underscore is read from any object but the module's own ``self``/``cls``
(torch's own names aside: this is about ComfyUI);
``ModelPatcher.backup`` is read only in ``nodes/patcher_backup.py``; the fields of
ComfyUI's weight adapters (``.weights``) only in ``nodes/adapters.py`` (and
in ``nodes/switch.py`` and ``nodes/fuse_report.py`` on their own classes).
``klora_core`` imports no ComfyUI module at all.
"""
from __future__ import annotations

import ast

from support.repo_files import REPO_ROOT

#: attribute -> the modules allowed to read it
OWNERS = {
    "backup": {"patcher_backup.py"},
    "weights": {"adapters.py", "switch.py", "fuse_report.py"},
}
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                 "execution")


def _root(node) -> str | None:
    """The name an attribute chain starts from (``torch`` for ``torch.nn.modules.conv._ConvNd``)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _attributes(path):
    """``(line, base name or None, attribute)`` for every attribute read not rooted in torch (not ComfyUI's)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and _root(node) != "torch":
            base = node.value.id if isinstance(node.value, ast.Name) else None
            yield node.lineno, base, node.attr


def test_private_fields_are_read_in_their_owner_module_only():
    problems = []
    for path in sorted((REPO_ROOT / "nodes").glob("*.py")):
        for line, base, attr in _attributes(path):
            where = f"nodes/{path.name}:{line}: {base or '...'}.{attr}"
            if attr.startswith("_") and not attr.startswith("__") and base not in ("self", "cls"):
                problems.append(where)
            if attr in OWNERS and path.name not in OWNERS[attr]:
                problems.append(where)
    assert not problems, problems


def test_the_method_imports_no_comfyui():
    problems = []
    for path in sorted((REPO_ROOT / "klora_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            problems += [f"{path.relative_to(REPO_ROOT)}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert not problems, problems
