# SPDX-License-Identifier: GPL-3.0-or-later
"""One LoRA reader: the loader node, the preview route and the command line say the same about a file.

Each file below is given to the three entry points as they run in the
product: the loader node's ``make_handle``, the preview route's file step
(``nodes/preview_scores.py``), and ``python -m klora_core map`` (in-process).  What
the reader says about the file (its message without the caller's label) is
computed here once, by :func:`klora_core.safe_load.load_tensors`, and must
appear word for word in all three answers.  Files the policy accepts (a
``.pt`` written by ``torch.save`` of plain tensors) must give all three the
same tensors as their ``.safetensors`` twin, and the same map on the command
line.  A pickle that would run code must never run, whoever reads it.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

LABEL = "LABEL"


class _Marker:
    """Unpickling this creates a file: proves a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _demo_pair(folder: Path):
    from klora_core.cli.demo_models import make_lora_pair

    subject, style = make_lora_pair(7)
    save_file(subject, str(folder / "subject.safetensors"))
    save_file(style, str(folder / "style.safetensors"))
    return subject, folder / "subject.safetensors", folder / "style.safetensors"


def _write_case(name: str, folder: Path, subject: dict, good: Path, marker: Path) -> Path:
    """Write the bad file ``name`` into ``folder``; return its path (it may not exist: "missing")."""
    data = good.read_bytes()
    first = next(iter(subject))
    writers = {
        "missing.safetensors": None,
        "folder.safetensors": lambda p: p.mkdir(),
        "truncated.safetensors": lambda p: p.write_bytes(data[: len(data) // 2]),
        "garbage.safetensors": lambda p: p.write_bytes(bytes(range(256)) * 8),
        "empty.safetensors": lambda p: p.write_bytes(b""),
        "disguised_pickle.safetensors": lambda p: torch.save({"x": torch.ones(2)}, p),
        "payload.pt": lambda p: torch.save({"x": _Marker(str(marker))}, p),
        "raw_payload.ckpt": lambda p: p.write_bytes(pickle.dumps({"x": _Marker(str(marker))}, protocol=2)),
        "unknown_extension.lora": lambda p: p.write_bytes(data),
        "int_weights.safetensors": lambda p: save_file({**subject, first: torch.ones(4, 4, dtype=torch.int32)},
                                                       str(p)),
        "nan_weights.safetensors": lambda p: save_file({**subject, first: torch.full((4, 4), float("nan"))},
                                                       str(p)),
        "no_tensors.pt": lambda p: torch.save({}, p),
        "text_values.pt": lambda p: torch.save({first: "not a tensor"}, p),
    }
    path = folder / name
    if writers[name] is not None:
        writers[name](path)
    return path


BAD_FILES = ["missing.safetensors", "folder.safetensors", "truncated.safetensors", "garbage.safetensors",
             "empty.safetensors", "disguised_pickle.safetensors", "payload.pt", "raw_payload.ckpt",
             "unknown_extension.lora", "int_weights.safetensors", "nan_weights.safetensors", "no_tensors.pt",
             "text_values.pt"]


def _reader_says(path: Path) -> str:
    """The reader's own words about ``path``, without the label the caller gives."""
    from klora_core.errors import KLoRAError
    from klora_core.safe_load import load_tensors

    with pytest.raises(KLoRAError) as exc:
        load_tensors(path, LABEL)
    message = str(exc.value)
    assert message.startswith(LABEL + ": ") and str(path) in message, message
    return message[len(LABEL) + 2:]


def _cli_error(capsys, path: Path, style: Path, out: Path) -> str:
    from klora_core.cli import main as cli

    assert cli.main(["map", str(path), str(style), "--out", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("klora: error: "), lines
    return lines[0]


@pytest.mark.parametrize("name", BAD_FILES)
def test_node_route_and_cli_say_the_same(klora_pack, tmp_path, capsys, name):
    from klora_pack.klora_core.errors import KLoRAError as PackError
    from klora_pack.nodes import preview_scores
    from klora_pack.nodes.handles import make_handle

    subject, good, style = _demo_pair(tmp_path)
    marker = tmp_path / "unpickled"
    path = _write_case(name, tmp_path, subject, good, marker)
    said = _reader_says(path)

    with pytest.raises(PackError) as node:
        make_handle("subject", name, str(path), 1.0)
    assert str(node.value) == f"subject LoRA '{name}': {said}"
    with pytest.raises(PackError) as route:
        preview_scores._modules(str(path), f"subject LoRA '{name}'")
    assert str(route.value) == f"subject LoRA '{name}': {said}"
    assert _cli_error(capsys, path, style, tmp_path / "map.png") == f"klora: error: subject LoRA: {said}"
    assert not marker.exists(), "a pickle payload ran"
    assert not (tmp_path / "map.png").exists()


def test_weights_only_pickle_reads_like_its_safetensors_twin(klora_pack, tmp_path, capsys):
    """A .pt of plain tensors: the same tensors for node and route, the same table from the command line."""
    from klora_core.cli import main as cli
    from klora_pack.nodes import preview_scores
    from klora_pack.nodes.handles import make_handle

    subject, good, style = _demo_pair(tmp_path)
    pt = tmp_path / "subject.pt"
    torch.save({"state_dict": subject}, pt)  # the wrapper some trainers write is unwrapped
    node_pt = make_handle("subject", pt.name, str(pt), 1.0).state_dict
    node_st = make_handle("subject", good.name, str(good), 1.0).state_dict
    assert node_pt.keys() == node_st.keys() and all(torch.equal(node_pt[k], node_st[k]) for k in node_st)
    route_pt = preview_scores._modules(str(pt), "subject")
    route_st = preview_scores._modules(str(good), "subject")
    assert list(route_pt) == list(route_st)
    assert all(torch.equal(route_pt[k][0], route_st[k][0]) and torch.equal(route_pt[k][1], route_st[k][1])
               for k in route_st)
    tables = []
    for subject_file in (pt, good):
        assert cli.main(["map", str(subject_file), str(style), "--table", "--steps", "12",
                         "--out", str(tmp_path / f"{subject_file.suffix[1:]}.png")]) == 0
        tables.append(capsys.readouterr().out.split("\nwrote ")[0])
    assert tables[0] == tables[1] and "S" in tables[0] and "T" in tables[0]


@pytest.mark.parametrize("low_byte", [0x80, 0x50])
def test_a_valid_safetensors_file_is_never_taken_for_a_pickle(tmp_path, low_byte):
    """A safetensors file starts with its header length (8 bytes, little-endian): any length of 128 mod 256
    begins with 0x80, a raw pickle's first byte.  Such a file is valid and must load, tensors unchanged."""
    import struct

    from klora_core.safe_load import load_tensors

    tensors = {"lora_unet_a.lora_up.weight": torch.arange(12.0).reshape(3, 4),
               "lora_unet_a.lora_down.weight": torch.ones(4, 2)}
    path = tmp_path / "header.safetensors"
    for pad in range(0, 600):  # the metadata's length moves the header length until its low byte is low_byte
        save_file(tensors, str(path), metadata={"note": "x" * pad})
        header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
        if header_length % 256 == low_byte:
            break
    else:
        pytest.fail(f"no header length with low byte {low_byte:#x} within 600 paddings")
    loaded = load_tensors(path, LABEL)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
