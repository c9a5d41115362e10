# SPDX-License-Identifier: GPL-3.0-or-later
"""Faults between and during runs: files replaced or deleted under the same name, out of memory while scoring.

- A LoRA file rewritten in place under its name (same size, same inode, its
  mtime forced back with ``os.utime``) between two runs: the loader must run
  again (its fingerprint_inputs signature changes: it includes the ctime, which no
  user call can set back) and the scores must be those of the new content
  (the score cache is keyed by the content hash, and the hash memo by ctime
  too), i.e. the run equals a fresh run on the new file.  Also for a file
  swapped through ``os.replace``, in-process and on a real ComfyUI server.
- A deleted file: the loader and a server prompt fail with a message naming it.
- Out of memory while scoring a large pair: a worker subprocess (this file
  run as a script) builds a tiny FLUX-shaped model whose ``txt_in`` weight is
  large (64 x 262144: 16 Mi entries), then caps its own address space with
  ``RLIMIT_AS`` at its size plus ``OOM_HEADROOM_MIB``, less than scoring that
  weight's delta needs (a 64 MiB float32 block and its 128 MiB float64 sum),
  and fuses.  The fuse must raise a ``KLoRAError`` naming the layer, leave
  the input model without patches or wrappers, and (cap lifted) a plain run
  must be bit-identical to one before the attempt; the same fuse without the
  cap must succeed (so the cap, not something else, caused the failure).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import lora_factory
from support import tiny_models
from test_fuse_exact import _sample

TESTS_DIR = Path(__file__).resolve().parent
FAMILY = "sd15"
#: Address space the OOM worker may add once its model is built.  The batched scorer works in chunks
#: of 4 Mi entries (16 MiB float32) whatever the layer size, so scoring txt_in needs about 20 MiB;
#: the per-layer fallback needs about 200 MiB.  12 MiB makes both fail, as a full GPU would.
OOM_HEADROOM_MIB = 12
#: txt_in width of the OOM worker's FLUX-shaped model (txt_in weight: hidden 64 x this).
OOM_CONTEXT_DIM = 262144


# --------------------------------------------------------------------- helpers


def _loras_dir(tmp_path) -> Path:
    import folder_paths

    d = tmp_path / "loras"
    d.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(d))
    return d


def _loader(role):
    from klora_pack.nodes.lora_loaders import KLoRAStyleLoader, KLoRASubjectLoader

    return KLoRASubjectLoader if role == "subject" else KLoRAStyleLoader


def _load(role, name, strength=1.0):
    handle, _ = _loader(role).execute(name, strength).args
    return handle


def _signature(role, name):
    return _loader(role).fingerprint_inputs(lora_name=name, strength=1.0)


def _lora_bytes(model, seed, tmp_path, rank=4) -> bytes:
    sd, _ = lora_factory.make_lora(model, "kohya", rank=rank, seed=seed)
    path = tmp_path / f"_bytes_{seed}_{rank}.safetensors"
    lora_factory.save_lora(sd, path)
    data = path.read_bytes()
    path.unlink()
    return data


def _rewrite_in_place_keep_mtime(path: Path, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` (same size) in place, then set atime/mtime back to their old values."""
    before = os.stat(path)
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def _replace_keep_mtime(path: Path, data: bytes) -> None:
    """Swap a new file in under ``path`` (os.replace, a new inode) with the old mtime."""
    before = os.stat(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _fresh_output(model, subject_bytes, style_handle, tmp_path, steps=6):
    """A run on ``subject_bytes`` under a name never seen before, with an empty score cache."""
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle
    from klora_pack.nodes.pair_scores import clear_score_cache

    fresh = tmp_path / f"fresh_{hashlib.sha256(subject_bytes).hexdigest()[:12]}.safetensors"
    fresh.write_bytes(subject_bytes)
    clear_score_cache()
    result = fuse_model(model, make_handle("subject", fresh.name, str(fresh), 1.0), style_handle)
    return _sample(result.model, FAMILY, steps), result


# --------------------------------------------------------------------- replaced / deleted, in-process


@pytest.mark.parametrize("how", ["rewrite_in_place", "os_replace"])
def test_replaced_file_same_name_old_mtime_uses_new_content(klora_pack, tmp_path, how):
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.pair_scores import clear_score_cache, score_cache_size

    model = tiny_models.build_model(FAMILY, seed=0)
    loras = _loras_dir(tmp_path)
    old, new = _lora_bytes(model, 1, tmp_path), _lora_bytes(model, 2, tmp_path)
    assert len(old) == len(new) and old != new  # same size: only the content tells them apart
    name = f"replaced_subject_{how}.safetensors"  # unique: folder_paths keeps every test's loras folder
    (loras / name).write_bytes(old)
    lora_factory.save_lora(lora_factory.make_lora(model, "kohya", rank=2, seed=8)[0],
                           loras / f"fault_style_{how}.safetensors")
    style = _load("style", f"fault_style_{how}.safetensors")

    clear_score_cache()
    sig_old = _signature("subject", name)
    first = _load("subject", name)
    assert first.sha256 == hashlib.sha256(old).hexdigest()
    out_old = _sample(fuse_model(model, first, style).model, FAMILY, 6)
    assert score_cache_size() == 1

    target = loras / name
    (_rewrite_in_place_keep_mtime if how == "rewrite_in_place" else _replace_keep_mtime)(target, new)

    # ComfyUI re-runs the loader only when fingerprint_inputs differs: it must, although size and mtime did not change.
    assert _signature("subject", name) != sig_old
    second = _load("subject", name)
    assert second.sha256 == hashlib.sha256(new).hexdigest(), "the content hash is stale (memo keyed by mtime)"
    result = fuse_model(model, second, style)  # the score cache still holds the old pair
    out_new = _sample(result.model, FAMILY, 6)
    assert score_cache_size() == 2  # scored again, under the new content's hash

    expected, fresh = _fresh_output(model, new, style, tmp_path)
    assert torch.equal(out_new, expected)
    assert result.plan.details == fresh.plan.details
    assert not torch.equal(out_new, out_old)


def test_deleted_file_fails_clearly(klora_pack, tmp_path):
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.handles import make_handle

    model = tiny_models.build_model(FAMILY, seed=0)
    loras = _loras_dir(tmp_path)
    path = loras / "deleted_subject.safetensors"
    path.write_bytes(_lora_bytes(model, 3, tmp_path))
    sig = _signature("subject", path.name)
    _load("subject", path.name)
    path.unlink()
    assert _signature("subject", path.name) != sig  # the loader runs again (and fails) instead of a cached result
    with pytest.raises(KLoRAError, match="deleted_subject.safetensors"):
        _load("subject", path.name)
    with pytest.raises(KLoRAError, match="file not found.*deleted_subject.safetensors"):
        make_handle("subject", path.name, str(path), 1.0)


# --------------------------------------------------------------------- replaced / deleted, on a real server


@pytest.mark.server
def test_replaced_and_deleted_file_on_a_real_server(request, comfy):
    """Same graph twice around an in-place rewrite with the mtime set back, then with the file deleted."""
    from support import detectable_models
    from support import workflow_tools
    from safetensors.torch import load_file
    from support.server_harness import ExecutionFailed, PromptRejected
    from test_soak import Files, Fuse, Spec, build_graph

    live = workflow_tools.live_server(request)
    server, names = live.server, live.names
    loras = Path(server.loras_dir)
    subject_b, _ = detectable_models.write_demo_loras(loras, seed=2026)
    old, new = (loras / names["subject"]).read_bytes(), (loras / subject_b).read_bytes()
    assert len(old) == len(new) and old != new
    swap = loras / "klora-fault-swap-subject.safetensors"
    swap.write_bytes(old)
    files = Files(unet={"A": names["unet"]}, subject={"A": swap.name, "B": subject_b},
                  style={"A": names["style"]}, clip=names["clip"])
    spec = Spec(seed=401, fuses=(Fuse(),))

    def run(spec, tag):
        entry = server.run(build_graph(files, spec, f"faults/{tag}"), timeout=180)
        item = entry["outputs"]["save"]["latents"][0]
        return load_file(str(server.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"]

    first = run(spec, "before")
    _rewrite_in_place_keep_mtime(swap, new)
    second = run(spec, "after")  # the very same graph: only the file's content changed
    reference = run(Spec(seed=401, fuses=(Fuse(subject="B"),)), "reference")
    assert torch.equal(second, reference), "the run after the rewrite did not use the new content"
    assert not torch.equal(first, second)

    swap.unlink()
    with pytest.raises((PromptRejected, ExecutionFailed)) as info:
        server.run(build_graph(files, spec, "faults/deleted"), timeout=180)
    assert swap.name in str(info.value), str(info.value)
    assert server.running()


# --------------------------------------------------------------------- out of memory while scoring


def _oom_worker(out_path: str) -> int:
    import resource

    sys.path.insert(0, str(TESTS_DIR))
    from support import comfy_env

    comfy_env.setup_comfy()
    comfy_env.load_pack()
    import psutil

    torch.set_num_threads(1)
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.fuse import SCOPE_ALL, fuse_model
    from klora_pack.nodes.handles import make_handle
    from klora_pack.nodes.pair_scores import clear_score_cache

    config = tiny_models.installed_config("flux", context_in_dim=OOM_CONTEXT_DIM)
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    base = model_config.get_model({}, device=cpu)
    base.eval()
    tiny_models.fill_seeded_(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    big = "diffusion_model.txt_in.weight"
    assert tuple(model.model.state_dict()[big].shape) == (64, OOM_CONTEXT_DIM)

    gen = torch.Generator().manual_seed(4)
    cond = [[torch.randn((1, 8, OOM_CONTEXT_DIM), generator=gen) * 0.01,
             {"pooled_output": torch.randn((1, 32), generator=gen), "guidance": 3.5}]]
    latent = torch.zeros((1, 16, 8, 8))
    noise = torch.randn((1, 16, 8, 8), generator=gen)

    def plain_run(patcher):
        return comfy.sample.sample(patcher, noise, 3, 1.0, "euler", "simple", cond, cond, latent,
                                   disable_pbar=True, seed=4)

    before = plain_run(model)
    folder = Path(out_path).parent
    handles = {}
    for role, seed, rank in (("subject", 1, 8), ("style", 2, 8)):
        sd, _ = lora_factory.make_lora(model, "kohya", rank=rank, seed=seed, scope="all")
        assert any("txt_in" in k for k in sd)
        path = folder / f"oom_{role}.safetensors"
        lora_factory.save_lora(sd, path)
        handles[role] = make_handle(role, path.name, str(path), 1.0)

    proc = psutil.Process()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    record = {"vms_mib": proc.memory_info().vms / 2 ** 20, "headroom_mib": OOM_HEADROOM_MIB}
    clear_score_cache()
    resource.setrlimit(resource.RLIMIT_AS, (proc.memory_info().vms + OOM_HEADROOM_MIB * 2 ** 20, hard))
    t0 = time.perf_counter()
    try:
        fuse_model(model, handles["subject"], handles["style"], scope=SCOPE_ALL)
        record["outcome"] = "ok"
    except KLoRAError as exc:
        record.update(outcome="error", message=str(exc))
    except BaseException as exc:  # noqa: BLE001
        record.update(outcome="other", type=type(exc).__name__, message=str(exc)[:2000])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    record["fuse_seconds"] = time.perf_counter() - t0
    record["patches_after"] = len(model.patches)
    record["wrappers_after"] = sum(len(v) for v in model.wrappers.values())
    record["plain_identical"] = bool(torch.equal(plain_run(model), before))
    # Control: the same fuse without the cap works (the cap, not the files, made it fail).
    t0 = time.perf_counter()
    fused = fuse_model(model, handles["subject"], handles["style"], scope=SCOPE_ALL)
    record["uncapped_fuse_seconds"] = time.perf_counter() - t0
    record["uncapped_switched"] = fused.stats["switched"]
    record["uncapped_output_finite"] = bool(torch.isfinite(plain_run(fused.model)).all())
    record["plain_identical_after_control"] = bool(torch.equal(plain_run(model), before))
    Path(out_path).write_text(json.dumps(record))
    return 0


def test_out_of_memory_while_scoring_is_a_clear_error_and_patches_nothing(comfy, tmp_path):
    out = tmp_path / "oom.json"
    proc = subprocess.run([sys.executable, __file__, "--oom-worker", str(out)], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    record = json.loads(out.read_text())
    print(f"\nOOM while scoring: {record}")
    assert record["outcome"] == "error", record
    message = record["message"]
    assert "out of memory" in message and "txt_in" in message, message
    assert "oom_subject.safetensors" in message and "oom_style.safetensors" in message, message
    assert "Nothing was patched" in message
    assert record["patches_after"] == 0 and record["wrappers_after"] == 0
    assert record["plain_identical"] and record["plain_identical_after_control"]
    assert record["uncapped_switched"] > 0 and record["uncapped_output_finite"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--oom-worker":
    sys.path.insert(0, str(TESTS_DIR))
    sys.exit(_oom_worker(sys.argv[2]))
