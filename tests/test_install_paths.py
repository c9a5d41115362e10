"""The three ways users install the pack, done for real against a fresh ComfyUI.

1. ComfyUI-Manager / ``git clone``: the repository's tracked files are copied
   into ``custom_nodes/klora-fusion`` of a FRESH ComfyUI tree, Manager's
   ``pip install -r requirements.txt`` runs with the test venv's pip (first as
   ``--dry-run --report``, then for real, only when the dry run found nothing
   to install), and a real ComfyUI server starts: its log must show the pack
   imported without error or warning, in under a second, and ``/object_info``
   must list the three nodes from that folder.
2. Comfy Registry: ``pyproject.toml`` is checked against the registry's
   published rules (docs.comfy.org "registry/specifications", comfy-cli's
   ``comfy node validate``/``pack`` behaviour) and parsed by ComfyUI's own
   ``comfy_config`` reader; the archive ``comfy node pack`` would build (git
   tracked files, minus ``.comfyignore`` matches, plus ``[tool.comfy].includes``)
   is written, unzipped into ``custom_nodes/klora-fusion`` of another fresh
   tree (what ``comfy node install klora-fusion`` does) and served the same way.
3. Dependencies: neither ``requirements.txt`` nor ``[project].dependencies``
   names torch, numpy, safetensors or anything else ComfyUI already ships,
   and importing the pack (inside ComfyUI, and bare) in a subprocess where
   only ComfyUI's requirements are importable adds only modules from the
   standard library, ComfyUI itself and its requirements.

Why a copy of ComfyUI and not the cached tree read-only with a temporary
custom_nodes folder: ComfyUI always also loads its own ``custom_nodes``
folder (whatever the cache holds, e.g. the example nodes) and writes into its
tree at runtime (``__pycache__``, default folders); a copy of the ~25 MB
vendored tree takes well under a second, starts with an empty
``custom_nodes`` and cannot leak anything into the cache.  Model folders,
``.git``, ``custom_nodes`` content, outputs and virtualenvs are not copied,
so a ``COMFYUI_PATH`` checkout with many models is cheap to copy as well.

The files copied are the git index's (``git ls-files``) with their working
tree content, so an uncommitted edit is tested, while a new file that is not
``git add``-ed is missing here exactly as it would be from a clone.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import comfy_env
from support.repo_files import git as _git
from support.repo_files import tracked_files
from support.server_harness import ComfyServer

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the same parser, as tomli or pip's vendored copy
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib

#: Each install path is checked against the ComfyUI under test (also the second one of scripts/test.sh).
pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
PACK_ID = "klora-fusion"
NODE_IDS = ("KLoRASubjectLoader", "KLoRAStyleLoader", "KLoRAFuse")
#: What every ComfyUI ships and a node pack must never (re)install.
COMFY_PROVIDED = {"torch", "torchvision", "torchaudio", "torchsde", "numpy", "safetensors", "pillow"}
#: The pack's runtime code (what ComfyUI imports or serves); tests, scripts and benches are not.
RUNTIME = ("__init__.py", "nodes/", "klora_core/", "web/")
MAX_IMPORT_SECONDS = 1.0


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the pack as git would hand it out ------------------------------------------------

def comfyignored() -> set:
    """Tracked paths that ``.comfyignore`` excludes from the registry archive (gitignore syntax)."""
    if not (REPO / ".comfyignore").is_file():
        return set()
    out = _git("ls-files", "-z", "--cached", "--ignored", "--exclude-from=.comfyignore")
    return {n for n in out.split("\0") if n}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def registry_archive_files() -> list:
    """What ``comfy node pack`` puts in the archive: tracked files minus .comfyignore plus includes."""
    files = [f for f in tracked_files() if f not in comfyignored()]
    for inc in pyproject().get("tool", {}).get("comfy", {}).get("includes", []):
        root = REPO / inc.lstrip("/")
        extra = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [p.relative_to(REPO).as_posix() for p in extra]
    return sorted(set(files))


# --- a fresh ComfyUI --------------------------------------------------------------------

_NOT_COPIED = {".git", "__pycache__", "custom_nodes", "models", "output", "input", "temp", "user", "venv", ".venv",
               "extra_model_paths.yaml"}


def fresh_comfyui(dest: Path) -> Path:
    src = comfy_env.find_comfy_root()

    def ignore(folder, names):
        return [n for n in names if n in _NOT_COPIED and Path(folder) == src or n == "__pycache__"]

    root = dest / "ComfyUI"
    shutil.copytree(src, root, ignore=ignore, symlinks=True)
    (root / "custom_nodes").mkdir()
    (root / "models").mkdir()
    return root


# --- Manager's pip step -------------------------------------------------------------------

def _pip(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_REQUIRE")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _installed() -> dict:
    res = _pip("list", "--format=json")
    assert res.returncode == 0, res.stderr
    return {_norm(p["name"]): p["version"] for p in json.loads(res.stdout)}


def manager_pip_install(pack_dir: Path, tmp: Path) -> None:
    """``pip install -r requirements.txt`` as Manager runs it; must install and upgrade nothing."""
    req = pack_dir / "requirements.txt"
    assert req.is_file()
    assert not (pack_dir / "install.py").exists(), "install.py would run code at install time"
    before = _installed()
    core = {n: md.version(n) for n in ("torch", "numpy", "safetensors")}
    report = tmp / "pip-report.json"
    # --no-index: the test never reaches the network; a requirement pip would have to fetch fails here.
    dry = _pip("install", "--dry-run", "--no-index", "--report", str(report), "-r", str(req))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    would = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"]]
    assert would == [], f"pip would install {would}"
    assert "Would install" not in dry.stdout
    real = _pip("install", "--no-index", "-r", str(req))
    assert real.returncode == 0, real.stdout + real.stderr
    assert "Successfully installed" not in real.stdout
    assert _installed() == before
    assert {n: md.version(n) for n in core} == core


# --- the server and its log -------------------------------------------------------------

#: The pack's names in a log line (not the test environment's cache folder ~/.cache/klora-comfyui).
_MENTION = re.compile(r"(?i)k-?lora(?!-comfyui)")
_IMPORT_LINE = re.compile(r"^\s*(?P<s>\d+(?:\.\d+)?) seconds(?P<failed> \(IMPORT FAILED\))?: (?P<path>.+?)\s*$")


class InstalledPackServer(ComfyServer):
    """The test harness's server for a ComfyUI that already holds the pack in its own custom_nodes.

    ``install_pack`` (of ``klora_core.cli.comfy.server.ComfyUIServer``) off: no link to this repository and
    no extra custom_nodes folder, so ComfyUI loads only the installed copy.
    """

    def prepare(self) -> None:
        self.install_pack = False
        super().prepare()


def check_server(comfy_root: Path, pack_dir: Path, workdir: Path) -> None:
    """Start ComfyUI from ``comfy_root`` (pack already in its custom_nodes) and check log and /object_info."""
    with InstalledPackServer(workdir=workdir, comfy_root=comfy_root) as server:
        assert server.pack_link is None
        info = server.object_info()
        extensions = server.get_json("/extensions")
        log = server.log_text()
    lines = log.splitlines()
    assert "Import times for custom nodes:" in log, log[-3000:]
    imports = [m for m in map(_IMPORT_LINE.match, lines) if m]
    ours = [m for m in imports if Path(m["path"]) == pack_dir]
    assert len(ours) == 1, f"pack import line missing for {pack_dir}:\n" + "\n".join(m.group(0) for m in imports)
    assert not ours[0]["failed"], ours[0].group(0)
    assert float(ours[0]["s"]) < MAX_IMPORT_SECONDS, ours[0].group(0)
    assert [Path(m["path"]) for m in imports] == [pack_dir], "a fresh tree loads no other custom node"
    # Nothing else from the pack: no warning, error, traceback frame or "Unable to parse pyproject.toml".
    mentions = [ln for ln in lines if (_MENTION.search(ln) or str(pack_dir) in ln) and ln != ours[0].group(0)]
    assert mentions == [], "\n".join(mentions)
    assert "Unable to parse pyproject.toml" not in log
    for node in NODE_IDS:
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["python_module"] == f"custom_nodes.{PACK_ID}", info[node]["python_module"]
    assert f"/extensions/{PACK_ID}/klora.js" in extensions


def copy_as_clone(dest: Path) -> Path:
    pack = dest / "custom_nodes" / PACK_ID
    for name in tracked_files():
        target = pack / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return pack


# --- 1. ComfyUI-Manager / git clone ------------------------------------------------------

def test_manager_style_install(tmp_path):
    comfy_root = fresh_comfyui(tmp_path)
    pack = copy_as_clone(comfy_root)
    assert sorted(p.relative_to(pack).as_posix() for p in pack.rglob("*") if p.is_file()) == tracked_files()
    manager_pip_install(pack, tmp_path)
    check_server(comfy_root, pack, tmp_path / "server")


# --- 2. Comfy Registry -------------------------------------------------------------------

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$")


def test_pyproject_follows_registry_rules():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    data = pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    # name = the node id: < 100 chars; letters, digits, '-', '_', '.'; no two specials in a row;
    # starts with a letter; lower case by convention; never "ComfyUI" in it.
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z0-9._-]+", name), name
    assert re.match(r"[A-Za-z]", name) and not re.search(r"[._-]{2}", name) and not name[-1] in "._-"
    assert name == name.lower() and "comfyui" not in name.lower().replace("-", "").replace("_", "")
    assert name == PACK_ID
    # version: semantic version X.Y.Z, and the same as klora_core.__version__ and the CHANGELOG's top release
    assert _SEMVER.match(project["version"]), project["version"]
    init = (REPO / "klora_core" / "__init__.py").read_text(encoding="utf-8")
    assert f'__version__ = "{project["version"]}"' in init
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.M)
    assert releases and releases[0] == project["version"], releases
    # license: a table, {file = ...} naming an existing file or {text = ...} (a bare string is wrong)
    lic = project["license"]
    assert isinstance(lic, dict) and set(lic) <= {"file", "text"} and lic, lic
    if "file" in lic:
        assert (REPO / lic["file"]).is_file()
    else:
        assert lic["text"] == "GPL-3.0-or-later"
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text(encoding="utf-8")[:200]
    assert project.get("description", "").strip()
    assert SpecifierSet(project["requires-python"]).contains(f"{sys.version_info[0]}.{sys.version_info[1]}")
    # urls.Repository is required
    assert re.fullmatch(r"https://\S+", project["urls"]["Repository"])
    # classifiers: OS and accelerator values must be ones the registry knows
    for c in project.get("classifiers", []):
        if c.startswith("Operating System :: "):
            assert c[len("Operating System :: "):].startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")), c
        if c.startswith("Environment :: "):
            assert c[len("Environment :: "):] in {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc",
                                                   "NPU :: Huawei Ascend", "GPU :: Apple Metal"}, c
    # dependencies: valid requirements, none of what ComfyUI ships (comfyui-frontend-package is a version pin)
    for dep in project.get("dependencies", []):
        req = Requirement(dep)
        assert _norm(req.name) not in COMFY_PROVIDED | _comfy_requirement_names(), dep
    # [tool.comfy]: PublisherId (required), DisplayName, Icon, requires-comfyui
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"].strip()
    icon = comfy["Icon"]
    assert re.fullmatch(r"https://\S+\.(svg|png|jpg|jpeg|gif)", icon, re.I), icon
    local_icon = REPO / "web" / icon.rsplit("/", 1)[-1]
    assert local_icon.relative_to(REPO).as_posix() in tracked_files(), "the icon the URL serves is in the repo"
    svg = local_icon.read_text(encoding="utf-8")
    w, h = (int(re.search(rf'\b{a}="(\d+)"', svg).group(1)) for a in ("width", "height"))
    assert w == h and w <= 400, (w, h)  # square, within the registry's 800 x 400 limit
    spec = SpecifierSet(comfy["requires-comfyui"])
    tested = comfy_env.comfy_version(comfy_env.find_comfy_root())
    assert spec.contains(Version(tested)), f"requires-comfyui {spec} excludes the tested ComfyUI {tested}"
    for inc in comfy.get("includes", []):
        assert (REPO / inc.lstrip("/")).exists(), inc


def _comfy_requirement_names() -> set:
    text = (comfy_env.find_comfy_root() / "requirements.txt").read_text(encoding="utf-8")
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(_norm(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]))
    return names


def test_comfyui_reads_the_pyproject(tmp_path):
    """ComfyUI's own reader (comfy_config, the registry's types) parses it: no startup warning, same values."""
    script = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from comfy_config import config_parser\n"
        "c = config_parser.extract_node_configuration(sys.argv[2])\n"
        "print(json.dumps({'name': c.project.name, 'version': c.project.version, 'license': c.project.license.text,\n"
        "    'repository': c.project.urls.repository, 'publisher': c.tool_comfy.publisher_id,\n"
        "    'display': c.tool_comfy.display_name, 'icon': c.tool_comfy.icon,\n"
        "    'requires_comfyui': c.project.supported_comfyui_version, 'os': c.project.supported_os,\n"
        "    'deps': c.project.dependencies}))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(comfy_env.find_comfy_root()), str(REPO)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    data = pyproject()
    assert got["name"] == data["project"]["name"] and got["version"] == data["project"]["version"]
    assert got["repository"] == data["project"]["urls"]["Repository"]
    assert got["publisher"] == data["tool"]["comfy"]["PublisherId"] and got["icon"] == data["tool"]["comfy"]["Icon"]
    assert got["display"] == data["tool"]["comfy"]["DisplayName"]
    assert got["requires_comfyui"] == data["tool"]["comfy"]["requires-comfyui"]
    assert got["os"], "classifiers give no operating system the registry accepts"
    assert got["deps"] == data["project"].get("dependencies", [])


def test_registry_archive_installs(tmp_path):
    files = registry_archive_files()
    archive = tmp_path / "node.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in files:
            zf.write(REPO / name, name)
    # What ships: the runtime pack and its metadata; nothing generated or cached.
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md",
                   "nodes/__init__.py", "klora_core/__init__.py", "web/klora.js", "web/icon.svg"):
        assert needed in files, needed
    junk = [f for f in files if re.search(r"(__pycache__|\.pyc$|\.egg-info|\.hypothesis|\.pytest_cache|"
                                          r"^demo-output/|^test-artifacts/|\.safetensors$|\.ckpt$|\.pt$)", f)]
    assert junk == []
    assert archive.stat().st_size < 5 * 1024 * 1024, archive.stat().st_size

    # `comfy node install` extracts the archive into custom_nodes/<node id>.
    comfy_root = fresh_comfyui(tmp_path)
    pack = comfy_root / "custom_nodes" / PACK_ID
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == files
        zf.extractall(pack)
    manager_pip_install(pack, tmp_path)
    check_server(comfy_root, pack, tmp_path / "server")


def test_runtime_code_follows_registry_standards():
    """No eval/exec, no pip at run time, no install.py, in the code ComfyUI loads from the pack."""
    import ast

    runtime = [f for f in registry_archive_files() if f.endswith(".py") and f.startswith(RUNTIME)]
    assert "__init__.py" in runtime and any(f.startswith("nodes/") for f in runtime)
    bad = []
    for name in runtime:
        tree = ast.parse((REPO / name).read_text(encoding="utf-8"), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                callee = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                qual = ast.unparse(f)
                if isinstance(f, ast.Name) and callee in ("eval", "exec", "compile", "__import__"):
                    bad.append(f"{name}:{node.lineno}: {qual}()")
                if qual in ("builtins.eval", "builtins.exec", "os.system", "os.popen"):
                    bad.append(f"{name}:{node.lineno}: {qual}()")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.search(r"(^|\s)(-m\s+)?pip\s+install\b", node.value) and not name.startswith("klora_core/cli"):
                    if "requirements.txt" not in node.value:  # advice to the user, not a command run
                        bad.append(f"{name}:{node.lineno}: pip install string")
    assert bad == []
    # The pack itself starts no process; only the command-line runner (klora_core.cli.comfy.server, used by
    # `python -m klora_core run`, never imported by ComfyUI) starts ComfyUI as a subprocess.
    spawners = [f for f in runtime if re.search(r"^\s*(import subprocess|from subprocess)",
                                                 (REPO / f).read_text(encoding="utf-8"), re.M)]
    assert set(spawners) <= {"klora_core/cli/comfy/server.py"}, spawners
    assert not (REPO / "install.py").exists()


# --- 3. dependencies --------------------------------------------------------------------

def _requirement_lines(path: Path) -> list:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_pack_never_installs_what_comfyui_ships():
    from packaging.requirements import Requirement

    forbidden = COMFY_PROVIDED | _comfy_requirement_names()
    assert {"torch", "numpy", "safetensors"} <= forbidden
    for line in _requirement_lines(REPO / "requirements.txt"):
        assert not line.startswith("-"), f"requirements.txt option {line!r} (index, editable, -r) is not allowed"
        req = Requirement(line)
        assert req.url is None, f"{line}: direct URL requirements are not allowed"
        assert _norm(req.name) not in forbidden, f"requirements.txt must not list {req.name}: ComfyUI ships it"
    for dep in pyproject()["project"].get("dependencies", []):
        assert _norm(Requirement(dep).name) not in forbidden - {"comfyui-frontend-package"}, dep


def _dist_closure(roots) -> set:
    """Normalised names of the installed distributions ``roots`` and everything they require (no extras)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [_norm(r) for r in roots]
    for _ in range(10000):  # bounded walk
        if not todo:
            break
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(_norm(req.name))
    return seen


def _allowed_modules(dists: set) -> tuple:
    """(allowed top-level module names, blocked top-level names) for the installed distributions."""
    allowed, blocked = set(), set()
    for top, owners in md.packages_distributions().items():
        (allowed if any(_norm(o) in dists for o in owners) else blocked).add(top)
    return allowed, blocked - allowed


_IMPORT_PROBE = r'''
import importlib.abc, importlib.util, json, logging, os, sys, warnings
cfg = json.load(open(sys.argv[1]))
blocked = set(cfg["blocked"])

class Block(importlib.abc.MetaPathFinder):
    """For imports the pack's code makes, pretend distributions ComfyUI does not require are not installed.

    (Only the pack's: ComfyUI and torch probe optional modules with find_spec and expect None.)"""
    hits = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in blocked:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.startswith(cfg["pack"] + os.sep):
                Block.hits.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: not a ComfyUI requirement)",
                                          name=name)
            frame = frame.f_back
        return None

sys.meta_path.insert(0, Block())
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.levelname} {record.name}: {record.getMessage()}")

if cfg["comfy_root"]:
    sys.path.insert(0, cfg["comfy_root"])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management, utils.extra_config, nodes  # ComfyUI's core, loaded before any pack
else:
    import torch, numpy, safetensors.torch, PIL.Image  # what a plain ComfyUI always has
before = set(sys.modules)
Block.hits.clear()  # only what the pack's import tries counts from here on
pack = cfg["pack"]
name = pack.replace(".", "_x_")  # how nodes.load_custom_node names a folder pack
logging.getLogger().addHandler(Keep(level=logging.WARNING))
logging.getLogger().setLevel(logging.INFO)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for sub in cfg["submodules"]:
        importlib.import_module(name + "." + sub)
added = sorted(m for m in set(sys.modules) - before if m != name and not m.startswith(name + "."))
nodes_found = []  # as ComfyUI's load_custom_node registers a V3 pack: comfy_entrypoint -> get_node_list
if hasattr(module, "comfy_entrypoint"):
    import asyncio
    extension = asyncio.run(module.comfy_entrypoint())
    nodes_found = [node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())]
print(json.dumps({"added": added, "nodes": sorted(nodes_found), "v1": hasattr(module, "NODE_CLASS_MAPPINGS"),
                  "blocked_hits": Block.hits, "records": records,
                  "warnings": [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught]}))
'''


@pytest.mark.parametrize("inside_comfyui", [True, False], ids=["inside-comfyui", "bare"])
def test_imports_only_what_comfyui_has(tmp_path, inside_comfyui):
    comfy_root = comfy_env.find_comfy_root()
    base = {"torch", "numpy", "pillow", "safetensors"}
    if inside_comfyui:
        base |= _comfy_requirement_names() - {"comfyui-frontend-package", "comfyui-workflow-templates",
                                              "comfyui-embedded-docs"}
    dists = _dist_closure(base)
    allowed, blocked = _allowed_modules(dists)
    allowed |= set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    if inside_comfyui:  # ComfyUI's own top-level modules and packages
        allowed |= {p.stem for p in comfy_root.glob("*.py")} | {p.name for p in comfy_root.iterdir() if p.is_dir()}
    pack = copy_as_clone(tmp_path)  # the pack as a clone has it, under its real folder name
    subs = sorted({f[:-3].replace("/", ".") for f in tracked_files()
                   if f.startswith("klora_core/") and f.endswith(".py") and not f.endswith("__main__.py")})
    cfg = tmp_path / "probe.json"
    cfg.write_text(json.dumps({"blocked": sorted(blocked), "pack": str(pack), "submodules": subs,
                               "comfy_root": str(comfy_root) if inside_comfyui else ""}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    res = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(cfg)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["v1"], "NODE_CLASS_MAPPINGS would make ComfyUI load the pack as V1 and skip comfy_entrypoint"
    if inside_comfyui:
        assert out["nodes"] == sorted(NODE_IDS)
    else:
        assert out["nodes"] == []  # guarded registration: nothing without ComfyUI
    foreign = sorted({m.split(".")[0] for m in out["added"]} - allowed)
    assert foreign == [], f"the pack imports modules a plain ComfyUI does not have: {foreign}"
    assert out["blocked_hits"] == [], f"the pack tried to import packages ComfyUI does not require: {out['blocked_hits']}"
    assert out["records"] == [], out["records"]
    ours = [w for w in out["warnings"] if w.startswith(str(pack))]
    assert ours == [], ours
