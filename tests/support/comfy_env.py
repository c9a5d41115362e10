"""Import a real ComfyUI in-process for tests, and import this repository as a pack.

    from support.comfy_env import setup_comfy, load_pack
    root = setup_comfy()          # ComfyUI root path; comfy.* importable, CPU only
    pack = load_pack()            # this repository as package ``klora_pack``

Where ComfyUI is found (same rules as scripts/setup_comfyui_env.sh and the
runner, :func:`klora_core.cli.comfy.server.find_comfy_root`):
1. ``COMFYUI_PATH`` (any ComfyUI checkout, e.g. a user's own install);
2. else the cached ComfyUI that ``KLORA_COMFYUI_VERSION`` names (default
   0.3.75): the path that script wrote to ``comfyui_path`` in
   ``$KLORA_ENV_DIR`` (0.3.75) or ``$KLORA_ENV_DIR/comfyui-<version>``
   (``KLORA_ENV_DIR`` defaults to ``~/.cache/klora-comfyui``).  Run pytest
   with that environment's ``venv/bin/python``: servers the tests start use
   the python running the tests.

Why the ordering rules below matter:
- ComfyUI parses the command line at import time unless told not to, and would
  choke on pytest's arguments.
- ``comfy.model_management`` picks its device when first imported, so
  ``args.cpu`` must be set before anything imports it.
- ComfyUI's ``nodes.py`` imports ``utils.extra_config``; ``utils`` must be
  ComfyUI's package (not some other ``utils`` module) when that happens.
- This pack has a subpackage ``nodes/`` that clashes with ComfyUI's top-level
  ``nodes.py``: the repository root must never precede ComfyUI's root on
  ``sys.path``, and the pack is only ever imported as package ``klora_pack``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import types
from pathlib import Path

logger = logging.getLogger("klora.tests.comfy_env")

#: Name under which the repository is imported as a package.
PACK_NAME = "klora_pack"
#: Repository root (this file lives in <root>/tests/support/).
REPO_ROOT = Path(__file__).resolve().parents[2]
# ``klora_core`` importable; appended, so the repository's ``nodes/`` never shadows ComfyUI's ``nodes.py``.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from klora_core.cli.comfy import server as _runner  # noqa: E402  (standard library + klora_core only)
from klora_core.errors import KLoRAError  # noqa: E402

SETUP_HINT = (
    "build the cached test environment with scripts/setup_comfyui_env.sh [--comfyui VERSION] "
    "(or point COMFYUI_PATH at a ComfyUI checkout) and run pytest with that venv's python"
)

_comfy_root: Path | None = None
#: How often ComfyUI was asked for (find_comfy_root / setup_comfy calls): tests/conftest.py checks
#: that only tests marked ``comfyui`` ask, so the second ComfyUI's leg of scripts/test.sh misses none.
lookups = 0


class ComfyEnvError(RuntimeError):
    """ComfyUI could not be located or imported; the message says how to fix it."""


def find_comfy_root() -> Path:
    """Locate the ComfyUI root (folder holding ``nodes.py`` and ``comfy/``) without importing it."""
    global lookups
    lookups += 1
    try:
        root = _runner.find_comfy_root()
    except KLoRAError as exc:
        raise ComfyEnvError(f"{exc}; {SETUP_HINT}") from None
    if not (root / "nodes.py").is_file():
        raise ComfyEnvError(f"{root} is not a ComfyUI checkout (no nodes.py); {SETUP_HINT}")
    return root


def comfy_version(root: Path) -> str:
    """The version a ComfyUI tree declares (``comfyui_version.py``), read without importing it."""
    text = (Path(root) / "comfyui_version.py").read_text(encoding="utf-8")
    return re.search(r"__version__\s*=\s*[\"']([^\"']+)", text).group(1)


def _module_file_under(name: str, root: Path) -> bool:
    """True when module ``name`` is not imported yet or was imported from under ``root``."""
    mod = sys.modules.get(name)
    if mod is None:
        return True
    origin = getattr(mod, "__file__", None) or ""
    if not origin and getattr(mod, "__path__", None):
        origin = next(iter(mod.__path__), "")
    try:
        Path(origin).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def setup_comfy(cpu: bool = True) -> Path:
    """Make ComfyUI importable in this process (CPU only unless ``cpu=False``) and return its root path.

    Idempotent: the first call decides the device (the benchmarks' GPU runs, bench/modes.py and
    bench/flips.py with ``--device cuda``, pass ``cpu=False``). Raises ComfyEnvError (pointing at scripts/setup_comfyui_env.sh)
    when ComfyUI is missing or fails to import.
    """
    global _comfy_root, lookups
    lookups += 1
    if _comfy_root is not None:
        return _comfy_root
    root = find_comfy_root()
    # Put ComfyUI's root strictly first: ``python -m pytest`` puts the current
    # directory (often this repository, whose ``nodes/`` would shadow
    # ComfyUI's ``nodes.py``) at sys.path[0].
    sys.path[:] = [p for p in sys.path if _resolved(p) != root]
    sys.path.insert(0, str(root))
    for name in ("nodes", "utils", "comfy"):
        if not _module_file_under(name, root):
            raise ComfyEnvError(
                f"module {name!r} was already imported from {sys.modules[name]!r} before ComfyUI was set up; "
                "import comfy_env.setup_comfy() before anything imports it"
            )
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        comfy.cli_args.args.cpu = cpu
        import comfy.model_management  # noqa: F401  (device chosen now)
        import utils.extra_config  # noqa: F401  (must precede ``import nodes``)
        import nodes  # noqa: F401
    except Exception as exc:  # any import failure means a broken environment
        raise ComfyEnvError(f"importing ComfyUI from {root} failed: {exc!r}; {SETUP_HINT}") from exc
    _comfy_root = root
    logger.debug("ComfyUI imported from %s", root)
    return root


def _resolved(p: str) -> Path | None:
    try:
        return Path(p or ".").resolve()
    except OSError:
        return None


def load_pack(bare: bool = False) -> types.ModuleType:
    """Import this repository as package ``klora_pack`` (after setup_comfy()) and return it.

    ``bare=True`` registers the package without running its ``__init__.py``
    (no node registration), so single product modules such as
    ``klora_pack.nodes.comfy_key_map`` can be imported on their own; a later
    ``load_pack()`` runs ``__init__.py`` in that same module object.
    """
    setup_comfy()
    init = REPO_ROOT / "__init__.py"
    mod = sys.modules.get(PACK_NAME)
    if mod is not None and (bare or not getattr(mod, "_klora_bare", False)):
        return mod
    if bare:
        mod = types.ModuleType(PACK_NAME, "K-LoRA pack (bare test import; __init__.py not run)")
        mod.__path__ = [str(REPO_ROOT)]
        mod.__file__ = str(init)
        mod.__package__ = PACK_NAME
        mod._klora_bare = True
        sys.modules[PACK_NAME] = mod
        return mod
    if not init.is_file():
        raise ComfyEnvError(f"{init} does not exist yet: the pack cannot be imported as a package")
    spec = importlib.util.spec_from_file_location(PACK_NAME, init, submodule_search_locations=[str(REPO_ROOT)])
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = mod
    else:
        # Upgrade a bare import in place so already-imported submodules stay valid.
        mod.__spec__ = spec
        mod.__loader__ = spec.loader
        del mod._klora_bare
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(PACK_NAME, None)
        raise
    return mod


def import_pack_module(relname: str, bare: bool = True) -> types.ModuleType:
    """Import ``klora_pack.<relname>`` (e.g. ``"nodes.comfy_key_map"``), loading the pack first."""
    load_pack(bare=bare)
    return importlib.import_module(f"{PACK_NAME}.{relname}")
