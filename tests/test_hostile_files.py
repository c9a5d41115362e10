# SPDX-License-Identifier: GPL-3.0-or-later
"""Hostile LoRA files and hostile preview requests: clear errors, no crash, bounded memory, no code run.

Files.  Every case below is written to disk and pushed through the product's
loading path exactly as the loader node runs it (``make_handle``, which calls
the project's one reader ``klora_core.safe_load.load_tensors`` and hashes the
content), then through what the preview route and the command line do with
what that reader returns (``klora_core.lora_file.lora_modules``), and, when a
file loads, through ``fuse_model`` with a good style LoRA on a tiny SD1.5 model.  The cases run in
one worker subprocess (this file run as a script) whose address space is
capped with ``RLIMIT_AS`` at its size after start-up plus ``CAP_MIB``: a file
that made the loader allocate what its header declares (terabytes) would
fail there with a MemoryError and be reported, and a hard crash (segfault,
abort) kills only the worker, whose results so far are streamed line by line,
so the report names the case.  Outcomes:

- ``error``: a ``KLoRAError`` whose message names the file;
- ``ok``: the file loads and fuses (legitimate files such as float8 LoRAs);
- ``ok_or_error``: either of the two (seeded random mutations of a valid file:
  a flipped byte in the data region is still a valid LoRA).

Anything else (another exception type, a crash, a MemoryError) fails.

Pickle payloads: ``.pt``/``.ckpt``/``.bin``/``.pth`` files (and a pickle
renamed to ``.safetensors``) whose unpickling would create a file through
several routes (``__reduce__`` to ``open``, ``os.system``,
``subprocess.Popen``, ``builtins.exec``/``eval``, a bound method, raw
protocol-0 opcodes, inside a zip-format ``torch.save`` archive and nested in a
``state_dict``).  Every one must be refused with a ``KLoRAError`` naming the
file, and the target file must never appear.

Preview route (``/klora/preview``, nodes/routes.py) on a real ComfyUI server
(tests/server_harness.py): path traversal in every spelling, unknown names,
wrong types, huge/negative/NaN/inf numbers, very long strings, missing
parameters, bad JSON bodies.  Each must be a 4xx JSON error, the server must
stay up, and a canary LoRA outside the loras folder must never be read: its
access time (ext4 ``relatime`` updates it on the first read after a write) and
its tensor names never show up in a response.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
#: Address space the worker may add after start-up (model, LoRAs and ComfyUI already loaded).
CAP_MIB = 768
#: Largest peak-RSS growth accepted over all file cases.
MAX_PEAK_GROWTH_MIB = 200
#: Seeded random cases per kind (bounded).
N_RANDOM = {"random_bytes": 12, "flip": 16, "header": 12, "cut": 8, "pt_flip": 8}
FUZZ_SEED = 20250226

FAMILY = "sd15"


# --------------------------------------------------------------------- safetensors building blocks


def st_pack(header, data: bytes = b"", header_len=None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length) + raw + data


def st_split(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _first(header) -> str:
    """The first weight (not alpha) tensor of a header."""
    return sorted(k for k in header if k.endswith(".weight"))[0]


def _st_from_tensors(tensors: dict) -> bytes:
    import safetensors.torch

    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})


def _edit(base: bytes, fn) -> bytes:
    header, data = st_split(base)
    out = fn(header, data)
    if isinstance(out, tuple):
        header, data = out
    return st_pack(header, data)


# --------------------------------------------------------------------- pickle payloads


class _OpenPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class _SystemPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


class _PopenPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.target],))


class _ExecPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.target!r}, 'w').write('pwned')",))


class _EvalPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import builtins

        return (builtins.eval, (f"open({self.target!r}, 'w').write('pwned')",))


def _protocol0_exec(target: str) -> bytes:
    """Hand-written protocol-0 pickle: builtins.exec("open(target,'w')") via GLOBAL + REDUCE."""
    code = f"open({target!r}, 'w').write('pwned')"
    return b"cbuiltins\nexec\n(V" + code.encode("raw_unicode_escape") + b"\ntR."


PAYLOADS = {
    # case name: (suffix, how to write it)
    "pk_open_raw_pickle": (".pt", "pickle", _OpenPayload),
    "pk_open_torch_zip": (".pt", "torch", _OpenPayload),
    "pk_os_system": (".ckpt", "pickle", _SystemPayload),
    "pk_os_system_zip": (".ckpt", "torch", _SystemPayload),
    "pk_popen": (".pth", "torch", _PopenPayload),
    "pk_exec_builtins": (".bin", "pickle", _ExecPayload),
    "pk_exec_builtins_zip": (".bin", "torch", _ExecPayload),
    "pk_eval_builtins": (".pt", "torch", _EvalPayload),
    "pk_protocol0_exec": (".ckpt", "raw", None),
    "pk_bound_method": (".pt", "torch", "bound"),
    "pk_nested_in_state_dict": (".ckpt", "torch", "nested"),
    "pk_disguised_safetensors": (".safetensors", "pickle", _OpenPayload),
}


def _write_payload(case: str, path: Path, target: Path) -> None:
    import torch

    suffix, how, kind = PAYLOADS[case]
    if how == "raw":
        path.write_bytes(_protocol0_exec(str(target)))
        return
    if kind == "bound":
        class _Bound:
            def __reduce__(self):
                return (Path(target).write_text, ("pwned",))

        obj = {"lora_unet_x.lora_down.weight": _Bound()}
    elif kind == "nested":
        obj = {"state_dict": {"lora_unet_x.lora_up.weight": torch.zeros(2, 2),
                              "lora_unet_x.lora_down.weight": _OpenPayload(str(target))}}
    else:
        obj = {"lora_unet_x.lora_down.weight": kind(str(target))}
    if how == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


# --------------------------------------------------------------------- the file cases


def _structured_cases(base: bytes, lora: dict):
    """``{name: (suffix, bytes or callable(path), expect)}`` for hand-made hostile files."""
    import torch

    header, data = st_split(base)
    first = _first(header)
    keys = sorted(lora)
    down = [k for k in keys if k.endswith("lora_down.weight")][0]
    up = down.replace("lora_down", "lora_up")
    alpha = down.replace("lora_down.weight", "alpha")

    def with_tensors(update):
        sd = {k: v.clone() for k, v in lora.items()}
        update(sd)
        return _st_from_tensors(sd)

    def set_first(**fields):
        def fn(h, d):
            h[first].update(fields)
            return h, d
        return _edit(base, fn)

    start, end = header[first]["data_offsets"]
    others = sorted(k for k in header if k not in ("__metadata__", first))
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    dup_header = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                  b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    dup_same = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    nonutf8_name = b'{"lora_unet_\xff\xfe.lora_down.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    nonutf8_meta = (b'{"__metadata__":{"note":"\xc3\x28"},'
                    b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')

    cases = {
        # header / offsets
        "st_offsets_past_end": set_first(data_offsets=[start, end + 4096]),
        "st_offsets_reversed": set_first(data_offsets=[end, start]),
        "st_offsets_gap": set_first(data_offsets=[start + 4, end]),
        "st_offsets_overlap": _edit(base, lambda h, d: (h.__setitem__(others[0], dict(h[others[0]], data_offsets=[start, end])) or h, d)),
        "st_offsets_negative": set_first(data_offsets=[-4, end]),
        "st_offsets_not_numbers": set_first(data_offsets=["zero", "end"]),
        # shapes
        "st_huge_shape": set_first(shape=[2 ** 40, 2 ** 40]),
        "st_shape_overflow": set_first(shape=[2 ** 63, 2 ** 63, 2 ** 63]),
        "st_shape_too_small": set_first(shape=[1]),
        "st_negative_shape": set_first(shape=[-1, 4]),
        "st_shape_not_list": set_first(shape="huge"),
        "st_rank_zero_module": with_tensors(lambda sd: sd.update({
            down: torch.zeros(0, sd[down].shape[1]), up: torch.zeros(sd[up].shape[0], 0), alpha: torch.tensor(2.0)})),
        "st_all_zero_size": with_tensors(lambda sd: sd.update({k: v.reshape(-1)[:0].reshape(0, *v.shape[1:])
                                                             for k, v in sd.items()})),
        "st_alpha_vector": with_tensors(lambda sd: sd.update({alpha: torch.ones(3)})),
        "st_rank_mismatch": with_tensors(lambda sd: sd.update({down: sd[down][:1].clone()})),
        # dtypes
        "st_unknown_dtype": set_first(dtype="Q7"),
        "st_dtype_not_string": set_first(dtype=32),
        "st_int32_weights": with_tensors(lambda sd: sd.update({k: (v * 100).to(torch.int32) for k, v in sd.items()})),
        "st_int8_one_weight": with_tensors(lambda sd: sd.update({up: (sd[up] * 100).to(torch.int8)})),
        "st_bool_weights": with_tensors(lambda sd: sd.update({k: v > 0 for k, v in sd.items()})),
        "st_complex_weights": st_pack({"lora_unet_x.lora_down.weight": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}},
                                      b"\x01" * 16),
        "st_uint16_weights": with_tensors(lambda sd: sd.update({up: (sd[up].abs() * 100).to(torch.uint16)})),
        "st_float4_weights": st_pack({"lora_unet_x.lora_down.weight": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}},
                                     b"\x11\x22"),
        "st_float8_e4m3_nan": with_tensors(lambda sd: sd.update(
            {up: sd[up].to(torch.float8_e4m3fn).view(torch.uint8).index_fill(0, torch.tensor([0]), 0x7F)
             .view(torch.float8_e4m3fn)})),
        "st_float16_inf": with_tensors(lambda sd: sd.update({up: sd[up].half().index_fill(0, torch.tensor([0]), float("inf"))})),
        "st_bfloat16_nan": with_tensors(lambda sd: sd.update({down: sd[down].bfloat16().index_fill(0, torch.tensor([0]), float("nan"))})),
        "st_values_overflow_product": with_tensors(lambda sd: sd.update({up: sd[up] * 1e30, down: sd[down] * 1e30})),
        # keys and names
        "st_duplicate_keys": st_pack(dup_header, b"\x00" * 8),
        "st_non_utf8_name": st_pack(nonutf8_name, b"\x00" * 4),
        "st_non_utf8_metadata": st_pack(nonutf8_meta, b"\x00" * 4),
        "st_metadata_not_strings": st_pack({"__metadata__": {"x": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                           b"\x00" * 4),
        "st_metadata_only": st_pack({"__metadata__": {"format": "pt"}}),
        "st_no_tensors": st_pack({}),
        "st_megabyte_name": st_pack({"lora_unet_" + "x" * (1 << 20) + ".lora_down.weight":
                                     {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
        "st_many_junk_tensors": _st_from_tensors({f"junk.{i}": torch.ones(1) for i in range(5000)}),
        "st_unknown_names_only": _st_from_tensors({"some.random.name.lora_down.weight": torch.randn(2, 8),
                                                   "some.random.name.lora_up.weight": torch.randn(8, 2)}),
        # header length and framing
        "st_header_len_past_file": st_pack(header, data, header_len=len(base) + 100),
        "st_header_len_huge": st_pack(header, data, header_len=2 ** 63),
        "st_header_len_max": st_pack(header, data, header_len=2 ** 64 - 1),
        "st_header_len_zero": st_pack(header, data, header_len=0),
        "st_header_len_short": st_pack(header, data, header_len=len(json.dumps(header)) - 10),
        "st_header_not_json": st_pack(b"this is not json at all", b""),
        "st_header_json_array": st_pack(b"[1, 2, 3]"),
        "st_header_json_null": st_pack(b"null"),
        "st_header_deep_nesting": st_pack(deep),
        "st_truncated_header": base[: 8 + len(json.dumps(header)) // 2],
        "st_truncated_data": base[: len(base) - len(data) // 2],
        "st_trailing_garbage": base + b"\x00garbage" * 64,
        "st_empty_file": b"",
        "st_three_bytes": b"\x01\x02\x03",
        "st_eight_bytes": struct.pack("<Q", 2),
        # legitimate edge files that must work
        "st_float8_lora": with_tensors(lambda sd: sd.update({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()
                                                            if not k.endswith(".alpha")})),
        "st_int_alpha": with_tensors(lambda sd: sd.update({alpha: torch.tensor(2)})),
        "st_duplicate_keys_identical": st_pack(dup_same, b"\x00" * 4),
    }
    expect = {name: "error" for name in cases}
    expect.update({"st_float8_lora": "ok", "st_int_alpha": "ok", "st_duplicate_keys_identical": "ok_or_error",
                   "st_trailing_garbage": "ok_or_error"})
    return {name: (".safetensors", blob, expect[name]) for name, blob in cases.items()}


def _pt_cases(lora: dict, pt_base: bytes):
    import io
    import zipfile

    import torch

    def saved(obj):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    def zip_with_pickle(edit):
        src = zipfile.ZipFile(io.BytesIO(four))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for name in src.namelist():
                blob = src.read(name)
                dst.writestr(name, edit(blob) if name.endswith("data.pkl") else blob)
        return out.getvalue()

    # torch.save({"a": torch.ones(4)}): its protocol-2 data.pkl holds the storage record as
    # (..., 'cpu', 4) and the tensor view as (storage, 0, (4,), ...); both counts are rewritten to 2**31-1.
    four = saved({"a": torch.ones(4)})
    big = b"J" + struct.pack("<i", 2 ** 31 - 1)
    cases = {
        "pt_int_keys": saved({1: torch.ones(2), 2: torch.ones(2)}),
        "pt_tuple_keys": saved({("a", 1): torch.ones(2)}),
        "pt_nested_dicts": saved({"a": {"b": torch.ones(2)}}),
        "pt_list": saved([torch.ones(2)]),
        "pt_state_dict_number": saved({"state_dict": 5}),
        "pt_string_values": saved({"lora_unet_x.lora_down.weight": "not a tensor"}),
        "pt_sparse": saved({k: v.to_sparse() for k, v in lora.items()}),
        "pt_complex": saved({k: torch.complex(v, v) if k.endswith("weight") else v for k, v in lora.items()}),
        "pt_quantized": saved({k: torch.quantize_per_tensor(v, 0.01, 0, torch.qint8) if k.endswith("weight") else v
                               for k, v in lora.items()}),
        "pt_bool": saved({k: v > 0 for k, v in lora.items()}),
        "pt_storage_size_huge": zip_with_pickle(lambda b: _replace_once(b, b"cpuq\x06K\x04t", b"cpuq\x06" + big + b"t")),
        "pt_view_size_huge": zip_with_pickle(lambda b: _replace_once(b, b"K\x00K\x04\x85", b"K\x00" + big + b"\x85")),
        "pt_both_sizes_huge": zip_with_pickle(lambda b: _replace_once(
            _replace_once(b, b"cpuq\x06K\x04t", b"cpuq\x06" + big + b"t"), b"K\x00K\x04\x85", b"K\x00" + big + b"\x85")),
        "pt_truncated_zip": pt_base[: len(pt_base) // 2],
        "pt_empty": b"",
        "pt_text": b"lora_unet_x.lora_down.weight = 1.0\n",
        # legitimate: a plain tensor dict, and a checkpoint-style {"state_dict": ...}
        "pt_plain_lora": pt_base,
        "ckpt_state_dict_lora": saved({"state_dict": dict(lora)}),
    }
    expect = {name: "error" for name in cases}
    expect.update({"pt_plain_lora": "ok", "ckpt_state_dict_lora": "ok"})
    suffix = {"ckpt_state_dict_lora": ".ckpt"}
    return {name: (suffix.get(name, ".pt"), blob, expect[name]) for name, blob in cases.items()}


def _replace_once(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) == 1, (old, blob)  # the pickle layout this edit relies on changed
    return blob.replace(old, new)


def _random_cases(base: bytes, pt_base: bytes):
    """Seeded mutations of valid files and random bytes (bounded count)."""
    rng = random.Random(FUZZ_SEED)
    header_len = struct.unpack("<Q", base[:8])[0]
    cases = {}
    for i in range(N_RANDOM["random_bytes"]):
        n = rng.choice([0, 1, 7, 8, 9, 64, rng.randint(10, 4096)])
        cases[f"fuzz_random_bytes_{i:02d}"] = (".safetensors", bytes(rng.getrandbits(8) for _ in range(n)))
    for i in range(N_RANDOM["flip"]):
        blob = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.getrandbits(8)
        cases[f"fuzz_flip_{i:02d}"] = (".safetensors", bytes(blob))
    for i in range(N_RANDOM["header"]):
        blob = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(8, 8 + header_len)] = rng.choice(b'{}[]",:0123456789-eE.aZ \xff\x00')
        cases[f"fuzz_header_{i:02d}"] = (".safetensors", bytes(blob))
    for i in range(N_RANDOM["cut"]):
        cases[f"fuzz_cut_{i:02d}"] = (".safetensors", base[: rng.randrange(len(base))])
    for i in range(N_RANDOM["pt_flip"]):
        blob = bytearray(pt_base)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.getrandbits(8)
        cases[f"fuzz_pt_flip_{i:02d}"] = (".pt", bytes(blob))
    return {name: (suffix, blob, "ok_or_error") for name, (suffix, blob) in cases.items()}


STRUCTURED = None  # filled lazily (needs torch + ComfyUI); names listed below for parametrisation

ST_NAMES = [
    "st_offsets_past_end", "st_offsets_reversed", "st_offsets_gap", "st_offsets_overlap", "st_offsets_negative",
    "st_offsets_not_numbers", "st_huge_shape", "st_shape_overflow", "st_shape_too_small", "st_negative_shape",
    "st_shape_not_list", "st_rank_zero_module", "st_all_zero_size", "st_alpha_vector", "st_rank_mismatch",
    "st_unknown_dtype", "st_dtype_not_string", "st_int32_weights", "st_int8_one_weight", "st_bool_weights",
    "st_complex_weights", "st_uint16_weights", "st_float4_weights", "st_float8_e4m3_nan", "st_float16_inf",
    "st_bfloat16_nan", "st_values_overflow_product", "st_duplicate_keys", "st_non_utf8_name",
    "st_non_utf8_metadata", "st_metadata_not_strings", "st_metadata_only", "st_no_tensors", "st_megabyte_name",
    "st_many_junk_tensors", "st_unknown_names_only", "st_header_len_past_file", "st_header_len_huge",
    "st_header_len_max", "st_header_len_zero", "st_header_len_short", "st_header_not_json", "st_header_json_array",
    "st_header_json_null", "st_header_deep_nesting", "st_truncated_header", "st_truncated_data",
    "st_trailing_garbage", "st_empty_file", "st_three_bytes", "st_eight_bytes", "st_float8_lora", "st_int_alpha",
    "st_duplicate_keys_identical",
]
PT_NAMES = [
    "pt_int_keys", "pt_tuple_keys", "pt_nested_dicts", "pt_list", "pt_state_dict_number", "pt_string_values",
    "pt_sparse", "pt_complex", "pt_quantized", "pt_bool", "pt_storage_size_huge", "pt_view_size_huge",
    "pt_both_sizes_huge",
    "pt_truncated_zip", "pt_empty", "pt_text", "pt_plain_lora", "ckpt_state_dict_lora",
]
RANDOM_NAMES = [f"fuzz_{kind}_{i:02d}" for kind, n in
                (("random_bytes", N_RANDOM["random_bytes"]), ("flip", N_RANDOM["flip"]),
                 ("header", N_RANDOM["header"]), ("cut", N_RANDOM["cut"]), ("pt_flip", N_RANDOM["pt_flip"]))
                for i in range(n)]


# --------------------------------------------------------------------- the worker (this file run as a script)


def _worker(manifest_path: str, out_path: str) -> int:
    """Run every case of the manifest through make_handle + fuse_model under an address-space cap."""
    import resource

    sys.path.insert(0, str(TESTS_DIR))
    from support import comfy_env

    comfy_env.setup_comfy()
    comfy_env.load_pack()
    import psutil
    import torch

    torch.set_num_threads(1)
    from support import tiny_models
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.klora_core.lora_file import lora_modules
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    manifest = json.loads(Path(manifest_path).read_text())
    model = tiny_models.build_model(FAMILY, seed=0)
    style = make_handle("style", "style.safetensors", manifest["style"], 1.0)
    fuse_model(model, make_handle("subject", "warmup.safetensors", manifest["warmup"], 1.0), style)  # warm caches
    proc = psutil.Process()
    cap = proc.memory_info().vms + CAP_MIB * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    cap_works = False
    try:
        torch.empty(2 * CAP_MIB * 2 ** 20, dtype=torch.uint8)
    except (RuntimeError, MemoryError):
        cap_works = True
    rss0 = proc.memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(out_path, "w") as out:
        out.write(json.dumps({"meta": "start", "cap_works": cap_works, "cap_mib": CAP_MIB,
                              "rss0_mib": rss0 / 2 ** 20}) + "\n")
        out.flush()
        for case in manifest["cases"]:
            t0 = time.perf_counter()
            record = {"case": case["name"]}
            stage = "load"
            try:
                handle = make_handle("subject", os.path.basename(case["path"]), case["path"], 1.0)
                record["modules"] = _modules_outcome(lora_modules, handle.state_dict, case["path"], KLoRAError)
                stage = "fuse"
                result = fuse_model(model, handle, style)
                record.update(outcome="ok", report=result.report.splitlines()[0][:200])
            except KLoRAError as exc:
                record.update(outcome="error", stage=stage, message=str(exc)[:2000])
            except BaseException as exc:  # noqa: BLE001 - anything else is what the test looks for
                record.update(outcome="other", stage=stage, type=type(exc).__name__, message=str(exc)[:2000])
            record["seconds"] = time.perf_counter() - t0
            record["rss_mib"] = proc.memory_info().rss / 2 ** 20
            out.write(json.dumps(record) + "\n")
            out.flush()
        peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.write(json.dumps({"meta": "end", "peak_growth_mib": (peak1 - peak0) / 2 ** 20,
                              "rss_end_mib": proc.memory_info().rss / 2 ** 20}) + "\n")
    # the model the cases were fused onto was never changed
    assert model.patches == {} and all(not v for v in model.wrappers.values())
    return 0


def _modules_outcome(lora_modules, state_dict, path, error_type) -> dict:
    """What the command line and the preview route make of a file the reader accepted: ok or a named error."""
    try:
        lora_modules(state_dict, 1.0, source=path)
        return {"outcome": "ok"}
    except error_type as exc:
        return {"outcome": "error", "message": str(exc)[:2000]}
    except Exception as exc:  # noqa: BLE001 - anything else is what the test looks for
        return {"outcome": "other", "message": f"{type(exc).__name__}: {str(exc)[:2000]}"}


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def file_results(comfy, tmp_path_factory):
    """Write every case, run the worker once, return ``(cases, results, meta, targets)``."""
    import torch

    from support import lora_factory
    from support import tiny_models

    work = tmp_path_factory.mktemp("hostile")
    files = work / "files"
    files.mkdir()
    model = tiny_models.build_model(FAMILY, seed=0)
    lora, _ = lora_factory.make_lora(model, "kohya", rank=4, alpha=2.0, seed=1)
    style, _ = lora_factory.make_lora(model, "kohya", rank=2, seed=8)
    lora_factory.save_lora(style, work / "style.safetensors")
    lora_factory.save_lora(lora, work / "warmup.safetensors")
    base = (work / "warmup.safetensors").read_bytes()
    import io

    buffer = io.BytesIO()
    torch.save(dict(lora), buffer)
    pt_base = buffer.getvalue()

    cases = {}
    cases.update(_structured_cases(base, lora))
    cases.update(_pt_cases(lora, pt_base))
    cases.update(_random_cases(base, pt_base))
    assert sorted(cases) == sorted(ST_NAMES + PT_NAMES + RANDOM_NAMES)
    targets = {}
    for name in PAYLOADS:
        target = work / "pwned" / f"{name}.txt"
        target.parent.mkdir(exist_ok=True)
        targets[name] = target
        cases[name] = (PAYLOADS[name][0], None, "error")
    manifest = {"style": str(work / "style.safetensors"), "warmup": str(work / "warmup.safetensors"), "cases": []}
    for name, (suffix, blob, expect) in cases.items():
        path = files / f"{name}{suffix}"
        if blob is None:
            _write_payload(name, path, targets[name])
        else:
            path.write_bytes(blob)
        manifest["cases"].append({"name": name, "path": str(path), "expect": expect})
    (work / "manifest.json").write_text(json.dumps(manifest))
    out = work / "results.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(work / "manifest.json"), str(out)],
                          cwd=str(work), env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    results = {r["case"]: r for r in lines if "case" in r}
    meta = {r["meta"]: r for r in lines if "meta" in r}
    meta["returncode"] = proc.returncode
    meta["stderr_tail"] = proc.stderr[-3000:]
    meta["seconds"] = elapsed
    meta["count"] = len(results)
    return {name: (files / f"{name}{cases[name][0]}", cases[name][2]) for name in cases}, results, meta, targets


def _check(file_results, name):
    cases, results, meta, _ = file_results
    path, expect = cases[name]
    record = results.get(name)
    assert record is not None, (f"the worker never finished case {name} (exit status {meta['returncode']}): "
                                f"it crashed or hung there\n{meta['stderr_tail']}")
    assert record["outcome"] != "other", f"{name}: {record['type']} at {record['stage']}: {record['message']}"
    allowed = {"error": {"error"}, "ok": {"ok"}, "ok_or_error": {"ok", "error"}}[expect]
    assert record["outcome"] in allowed, f"{name}: expected {expect}, got {record}"
    if record["outcome"] == "error":
        assert path.name in record["message"], f"{name}: the error does not name the file: {record['message']}"
    return record


# --------------------------------------------------------------------- tests


def test_worker_ran_every_case_under_a_memory_cap(file_results):
    cases, results, meta, _ = file_results
    assert meta["returncode"] == 0, meta["stderr_tail"]
    assert set(results) == set(cases)
    assert meta["start"]["cap_works"], "RLIMIT_AS did not stop a large allocation: the memory check means nothing"
    assert meta["end"]["peak_growth_mib"] < MAX_PEAK_GROWTH_MIB, meta["end"]
    slowest = max(results.values(), key=lambda r: r["seconds"])
    assert slowest["seconds"] < 20, slowest
    outcomes = [r["outcome"] for r in results.values()]
    print(f"\nhostile files: {len(results)} cases ({outcomes.count('error')} refused, {outcomes.count('ok')} loaded "
          f"and fused) in {meta['seconds']:.1f} s; worker RSS {meta['start']['rss0_mib']:.0f} MiB at the start, "
          f"{meta['end']['rss_end_mib']:.0f} MiB at the end, peak growth {meta['end']['peak_growth_mib']:.1f} MiB "
          f"under a {CAP_MIB} MiB address-space cap; slowest case {slowest['case']} {slowest['seconds']:.2f} s")


@pytest.mark.parametrize("name", ST_NAMES)
def test_hostile_safetensors(file_results, name):
    _check(file_results, name)


@pytest.mark.parametrize("name", PT_NAMES)
def test_hostile_pickle_containers(file_results, name):
    _check(file_results, name)


def test_seeded_random_files(file_results):
    """Random bytes, byte flips, header edits, truncations: never anything but ok or a KLoRAError naming the file."""
    failures = []
    for name in RANDOM_NAMES:
        try:
            _check(file_results, name)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)
    outcomes = [file_results[1][n]["outcome"] for n in RANDOM_NAMES]
    assert outcomes.count("error") >= len(RANDOM_NAMES) // 2  # most random files are refused, not silently used


def test_files_the_reader_accepts_group_cleanly(file_results):
    """After the reader, the command line's and the preview route's grouping (lora_modules) of every loaded
    hostile file is a LoRA or a KLoRAError naming the file, never another exception."""
    cases, results, _, _ = file_results
    checked, problems = 0, []
    for name, record in results.items():
        grouped = record.get("modules")
        if grouped is None:
            continue  # refused by the reader (checked above)
        checked += 1
        if grouped["outcome"] == "other" or (grouped["outcome"] == "error"
                                             and cases[name][0].name not in grouped["message"]):
            problems.append(f"{name}: {grouped}")
    assert checked >= 10, checked
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_pickle_payload_never_runs(file_results, name):
    record = _check(file_results, name)
    assert record["outcome"] == "error"
    _, _, _, targets = file_results
    assert not targets[name].exists(), f"{name}: unpickling ran the payload ({targets[name]} was written)"
    assert not any(targets[name].parent.iterdir()), "a payload wrote something"


def test_error_messages_say_what_is_wrong(file_results):
    """Spot checks that the refusals say why (not only that something failed)."""
    _, results, _, _ = file_results
    expectations = {
        "st_int32_weights": "dtype int32",
        "st_bool_weights": "dtype bool",
        "st_complex_weights": "complex",
        "st_float8_e4m3_nan": "NaN or infinite",
        "st_rank_zero_module": "empty",
        "st_alpha_vector": "alpha",
        "st_huge_shape": "not a valid safetensors file",
        "st_header_len_huge": "not a valid safetensors file",
        "pt_int_keys": "text name",
        "pt_sparse": "sparse",
        "pk_os_system": "could not be loaded safely",
    }
    wrong = {name: results[name]["message"] for name, text in expectations.items()
             if text not in results[name].get("message", "")}
    assert not wrong, wrong


# --------------------------------------------------------------------- preview route on a real server
#
# Complements tests/test_preview_route.py (which checks the plain cases: "../x", absolute paths, NaN/inf,
# ranges, wrong JSON types, missing/repeated parameters): encoded and mixed spellings aimed at a real file
# outside the loras folder, extreme numbers, long strings and bodies, all against one canary.

CANARY_KEY = "lora_unet_klora_canary_do_not_read"
MAX_URL_NAME = 4000  # aiohttp refuses request lines over 8190 bytes before any route runs


def _http(server, method, path_and_query, body=None, headers=None, timeout=30):
    """``(status, content type, bytes)`` without raising on 4xx/5xx; loopback only, no proxies."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(server.url + path_and_query, data=body, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture(scope="module")
def preview_target(request, comfy, tmp_path_factory):
    """The session's shared server (tests/workflow_tools.py), a canary LoRA outside its loras folder, a control."""
    import torch
    from safetensors.torch import save_file

    from support import workflow_tools

    live = workflow_tools.live_server(request)
    server = live.server
    canaries = []
    for folder in (server.workdir, tmp_path_factory.mktemp("canary")):
        path = Path(folder) / "klora-canary.safetensors"
        save_file({CANARY_KEY + ".lora_down.weight": torch.ones(2, 320),
                   CANARY_KEY + ".lora_up.weight": torch.ones(320, 2)}, str(path))
        canaries.append(path)
    control = canaries[1].with_name("klora-canary-control.safetensors")
    control.write_bytes(canaries[1].read_bytes())
    now = time.time_ns()
    for path in canaries + [control]:  # atime well before mtime: with relatime the next read updates it
        os.utime(path, ns=(now - 86_400 * 10 ** 9, now))
    atimes = {path: os.stat(path).st_atime_ns for path in canaries}
    return live, canaries, control, atimes


def _hostile_names(server, canaries) -> list:
    loras = Path(server.loras_dir)
    rel = os.path.relpath(canaries[0], loras)
    name = canaries[0].name
    return [
        rel, "./" + rel, rel.replace("/", "\\"), "..\\" * 3 + name, str(canaries[0]), str(canaries[1]),
        "file://" + str(canaries[0]), "//" + str(canaries[0]).lstrip("/"), str(loras) + "/" + rel,
        "sub/../" + rel, "....//" + name, "..././" + name, "\uff0e\uff0e/" + name,  # fullwidth dots
        "%2e%2e%2f" + name, "%252e%252e%252f" + name, ".." + "%2f" + name, "..%c0%af" + name,
        rel + "\x00.safetensors", "\\\\?\\" + str(canaries[0]), "C:" + name, "~/" + name, "$HOME/" + name,
        name, "x" * MAX_URL_NAME,
    ]


def _assert_json_4xx(status, ctype, payload, what):
    assert 400 <= status < 500, f"{what}: status {status}: {payload[:300]!r}"
    assert ctype.startswith("application/json"), f"{what}: {ctype}: {payload[:300]!r}"
    answer = json.loads(payload)
    assert answer["error"]["message"], answer
    assert CANARY_KEY not in payload.decode("utf-8", "replace") and "canary_do_not_read" not in payload.decode(
        "utf-8", "replace"), f"{what}: the canary's content is in the answer"
    return answer


def test_preview_route_refuses_hostile_names(preview_target):
    import urllib.parse

    live, canaries, control, atimes = preview_target
    server = live.server
    names = _hostile_names(server, canaries)
    sent = 0
    for name in names:
        for role in ("subject", "style"):
            params = {"subject": live.names["subject"], "style": live.names["style"], role: name}
            for path in ("/klora/preview", "/klora/preview.png"):
                status, ctype, payload = _http(server, "GET", path + "?" + urllib.parse.urlencode(params))
                answer = _assert_json_4xx(status, ctype, payload, f"GET {path} {role}={name[:80]!r}")
                assert answer["error"].get("param") == role, answer
                sent += 1
            body = json.dumps(params).encode()
            status, ctype, payload = _http(server, "POST", "/klora/preview", body,
                                           {"Content-Type": "application/json"})
            _assert_json_4xx(status, ctype, payload, f"POST {role}={name[:80]!r}")
            sent += 1
    # Encodings written into the raw query string (decoded once by the server, never twice).
    rel = os.path.relpath(canaries[0], server.loras_dir)
    for raw in (rel.replace(".", "%2e").replace("/", "%2f"), rel.replace("/", "%5c"), rel.replace("/", "%2F"),
                urllib.parse.quote(str(canaries[0]), safe=""), "%2e%2e/" * 3 + canaries[0].name):
        query = f"subject={raw}&style={urllib.parse.quote(live.names['style'])}"
        status, ctype, payload = _http(server, "GET", "/klora/preview?" + query)
        _assert_json_4xx(status, ctype, payload, f"raw query {raw!r}")
        sent += 1
    _assert_canaries_unread(canaries, control, atimes)
    _assert_server_fine(live)
    print(f"\npreview route: {sent} hostile-name requests, all JSON 4xx; canaries unread")


@pytest.mark.parametrize("param, values", [
    ("alpha", ["1e308", "-1e308", "1e999", "-1e999", "NaN", "nan", "-nan", "Infinity", "+inf", "-inf", "0x10",
               "--1", "1e", "\x00", "", " ", "9" * 400]),
    ("beta", ["-1.0000001", "-1e308", "nan", "inf", "1e999"]),
    ("subject_strength", ["-100.0001", "1e308", "-inf", "nan"]),
    ("map_steps", ["-1", "0", "-0", "151", "99999999999999999999999999999999", "1e3", "0x10", "nan", "inf",
                   "1.5", "+-1", "-+5", "\u00b2", "\u0661\u0662", "9" * 4000]),
    ("pattern", ["S", "s ", "s*" * 1000, "\x00", "../s"]),
    ("scope", ["ATTENTION PROJECTIONS", "all", "x" * 4000]),
    ("x" * 1000, ["1"]),
])
def test_preview_route_refuses_hostile_numbers_and_strings(preview_target, param, values):
    import urllib.parse

    live, canaries, control, atimes = preview_target
    for value in values:
        params = {"subject": live.names["subject"], "style": live.names["style"], param: value}
        status, ctype, payload = _http(live.server, "GET", "/klora/preview?" + urllib.parse.urlencode(params))
        answer = _assert_json_4xx(status, ctype, payload, f"{param[:40]}={value[:60]!r}")
        assert answer["error"].get("param", "")[:40] == param[:40], answer
    _assert_server_fine(live)


@pytest.mark.parametrize("body", [
    {"alpha": 1e400}, {"alpha": float("nan")}, {"alpha": -float("inf")}, {"alpha": 10 ** 400},
    {"map_steps": 10 ** 30}, {"map_steps": -5}, {"map_steps": True}, {"map_steps": "20"}, {"map_steps": [20]},
    {"subject_strength": {"value": 1}}, {"subject": ["a", "b"]}, {"subject": 5}, {"subject": None},
    {"style": {"name": "x"}}, {"subject": "x" * 60_000},
])
def test_preview_route_refuses_hostile_json(preview_target, body):
    live, _, _, _ = preview_target
    params = {"subject": live.names["subject"], "style": live.names["style"], **body}
    if body.get("subject", 0) is None:
        params.pop("subject")
    raw = json.dumps(params, allow_nan=True).encode()
    status, ctype, payload = _http(live.server, "POST", "/klora/preview", raw, {"Content-Type": "application/json"})
    _assert_json_4xx(status, ctype, payload, f"POST {str(body)[:80]}")


def test_preview_route_refuses_hostile_bodies(preview_target):
    live, canaries, control, atimes = preview_target
    server = live.server
    bodies = [
        b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b"1e999", b'"' + b"x" * 1000 + b'"',
        b"[" * 30_000 + b"]" * 30_000,  # deep nesting under 64 KiB: beyond Python's recursion limit
        b'{"subject": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        json.dumps({"subject": live.names["subject"], "style": live.names["style"], "pad": "x" * 70_000}).encode(),
        b"{" + b'"a":1,' * 20_000 + b'"b":2}',  # over 64 KiB
        b'{"alpha": ' + b"9" * 5000 + b"}",  # an integer over Python's 4300-digit conversion limit
        b'{"alpha": 1, "alpha": 2}',  # duplicate keys
    ]
    for body in bodies:
        status, ctype, payload = _http(server, "POST", "/klora/preview", body, {"Content-Type": "application/json"})
        _assert_json_4xx(status, ctype, payload, f"body {body[:40]!r} ({len(body)} bytes)")
    # A request line over aiohttp's 8190-byte limit is refused by aiohttp itself (a 4xx before any route).
    status, _, _ = _http(server, "GET", "/klora/preview?subject=" + "x" * 20_000)
    assert 400 <= status < 500
    _assert_canaries_unread(canaries, control, atimes)
    _assert_server_fine(live)


def _assert_canaries_unread(canaries, control, atimes):
    st = os.stat(control)
    os.utime(control, ns=(st.st_mtime_ns - 86_400 * 10 ** 9, st.st_mtime_ns))
    before = os.stat(control).st_atime_ns
    with open(control, "rb") as f:  # the check works: one read of the control moves its atime
        f.read(16)
    if os.stat(control).st_atime_ns == before:  # a noatime mount: only the answers' content is checked
        warnings.warn("atime does not move on read on this file system: the canary access check is skipped")
        return
    for path in canaries:
        assert os.stat(path).st_atime_ns == atimes[path], f"{path} was read by the server"


def _assert_server_fine(live):
    import urllib.parse

    server = live.server
    assert server.running(), "the server died"
    status, _, _ = _http(server, "GET", "/system_stats")
    assert status == 200
    params = {"subject": live.names["subject"], "style": live.names["style"], "map_steps": "4"}
    status, ctype, payload = _http(server, "GET", "/klora/preview?" + urllib.parse.urlencode(params))
    assert status == 200 and json.loads(payload)["steps"] == 4
    assert "K-LoRA preview failed" not in server.log_text(), "the preview route hit an unexpected error"


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2], sys.argv[3]))
