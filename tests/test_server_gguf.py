"""K-LoRA on a GGUF model inside a REAL ComfyUI server, with the REAL ComfyUI-GGUF pack installed beside it.

The server (tests/support/server_harness.py) gets ComfyUI-GGUF in its custom_nodes folder (unpacked from the
shared source tarball, tests/support/gguf_pack.py) and the demo UNet as a Q8_0 ``.gguf`` file; graphs are
test_server.py's, with UnetLoaderGGUF as the model loader:

- forced subject (alpha = beta = 0) through K-LoRA Fuse in mode bake (the switches in the patch list, which
  ComfyUI-GGUF applies at every forward, as it does LoraLoaderModelOnly's) equals the stock
  LoraLoaderModelOnly(subject), bit for bit, on the same GGUF model;
- the default schedule in the automatic mode, bypass on GGUF (the report says so and why), switches during
  sampling (the report's first/last step counts) and differs from the forced run;
- a plain run after the K-LoRA runs is bit-identical to one before them.

Without the tarball or the ``gguf`` package: fails under CI=true, skips (with the reason) elsewhere.
"""
from __future__ import annotations

import pytest
import torch

from support import detectable_models
from support import gguf_pack
from support import quantized_files
from support.server_harness import ComfyServer
from test_server import _first_last_subject, _graph, _klora, _latent, _lora_only

pytestmark = [pytest.mark.server, pytest.mark.slow]

GGUF_NAME = "klora-demo-sd15-unet-Q8_0.gguf"


@pytest.fixture(scope="module")
def server():
    gguf_pack.require()
    from klora_core.cli import demo_models

    s = ComfyServer()
    gguf_pack.install_into(s.workdir / "custom_nodes")
    with s:
        s.names = detectable_models.write_all(s)
        quantized_files.write_gguf(demo_models.make_unet_state_dict(demo_models.DEFAULT_SEED), s.unet_dir / GGUF_NAME,
                                   "Q8_0")
        yield s


def _on_gguf(graph: dict) -> dict:
    graph["1"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": GGUF_NAME}}
    return graph


def _plain(names, end_at_step):
    # A different no-op end_at_step re-runs the sampler on the same cached model (see test_server._plain).
    return _on_gguf(_graph(names, ({}, ["1", 0]), {"end_at_step": end_at_step}, prefix=f"plain{end_at_step}"))


def test_klora_on_gguf_through_comfyui_gguf(server):
    names = server.names
    assert "UnetLoaderGGUF" in server.object_info(), server.log_text()[-3000:]
    before = _latent(server, server.run(_plain(names, 10000)))

    forced_entry = server.run(_on_gguf(_klora(names, alpha=0.0, beta=0.0, mode="bake")))
    forced = _latent(server, forced_entry)
    subject_only = _latent(server, server.run(_on_gguf(_lora_only(names, names["subject"]))))
    assert torch.equal(forced, subject_only), "forced subject differs from LoraLoaderModelOnly(subject)"
    assert not torch.equal(forced, before)

    entry = server.run(_on_gguf(_klora(names)))
    report = "\n".join(entry["outputs"]["12"]["text"])
    assert "mode bypass: weights untouched, the chosen LoRA is added at forward time (auto: GGUF weights; " \
        "bypass adds the low-rank term at forward" in report, report
    first, last = _first_last_subject(report)
    assert first > last, report
    klora = _latent(server, entry)
    assert torch.isfinite(klora).all() and not torch.equal(klora, forced)

    after = _latent(server, server.run(_plain(names, 9999)))
    assert torch.equal(before, after), "the GGUF base model changed after the K-LoRA runs"
