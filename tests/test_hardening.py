"""Findings of hostile testing, on the shared real ComfyUI server (tests/support/workflow_tools.live_server).

1. A workflow with ``"strength": NaN`` (or alpha/beta NaN) passes ComfyUI's
   min/max check, because every comparison with NaN is false.  Before, with
   the other strength non-zero the run failed blaming "a LoRA delta contains
   NaN values" in two valid files, and with the other strength 0 the output
   was silently NaN.  Now the node refuses it, naming the input.
2. ``/klora/preview`` error messages name LoRA files as ComfyUI lists them,
   never by their absolute path on the server.
3. Uncached previews no longer wait in asyncio's default thread pool, which
   aiohttp also serves files from: ComfyUI's ``/view`` stays fast while
   several slow previews are requested at once (before: 30.8 s instead of
   1.3 ms with six in flight).
"""
from __future__ import annotations

import json
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

from support import workflow_tools as wt

pytestmark = [pytest.mark.server]

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NAN = float("nan")


@pytest.fixture(scope="module")
def live(request):
    return wt.live_server(request)


def _get(live, path, params=None, timeout=120):
    url = live.server.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


# --------------------------------------------------------------------------- 1. NaN inputs

def _graph(live, seed, inputs):
    """The ``python -m klora_core run`` workflow on the small models, with some inputs replaced."""
    from klora_core.cli.run_graphs import IDS, build_workflow

    opts = types.SimpleNamespace(subject_strength=1.0, style_strength=1.0, pattern="s", scope="attention",
                                 outside_scope="both", progress_measure="noise", steps=1, prompt="a dog",
                                 negative="", cfg=1.0, sampler="euler", scheduler="normal", width=64, height=64)
    names = {k: live.names[k] for k in ("unet", "clip", "vae", "subject", "style")}
    graph = build_workflow(opts, names, seed, 1.5, 0.5, f"hardening/nan{seed}")
    for (node, name), value in inputs.items():
        graph[IDS[node]]["inputs"][name] = value
    return graph


@pytest.mark.parametrize("case, inputs, fragment", [
    ("subject NaN, style 1", {("subject", "strength"): NAN}, "strength must be a finite number"),
    ("subject NaN, style 0", {("subject", "strength"): NAN, ("style", "strength"): 0.0},
     "strength must be a finite number"),
    ("style NaN, subject 0", {("style", "strength"): NAN, ("subject", "strength"): 0.0},
     "strength must be a finite number"),
    ("alpha NaN", {("fuse", "alpha"): NAN}, "alpha must be a finite number"),
    ("alpha NaN, style 0", {("fuse", "alpha"): NAN, ("style", "strength"): 0.0}, "alpha must be a finite number"),
    ("beta NaN", {("fuse", "beta"): NAN}, "beta must be a finite number"),
    ("beta NaN, subject 0", {("fuse", "beta"): NAN, ("subject", "strength"): 0.0}, "beta must be a finite number"),
])
def test_non_finite_inputs_are_refused_naming_the_input(live, case, inputs, fragment):
    from support.server_harness import ExecutionFailed

    graph = _graph(live, 7000 + len(case) * 31 + sum(map(ord, case)), inputs)
    body = json.dumps({"prompt": graph})
    assert "NaN" in body or "Infinity" in body  # what a workflow file can carry, and ComfyUI's parser accepts
    with pytest.raises(ExecutionFailed) as info:
        live.server.run(graph, timeout=120)
    message = str(info.value)
    assert fragment in message, message
    (node, name), = [k for k in inputs if isinstance(inputs[k], float) and not abs(inputs[k]) < float("inf")]
    node_type = {"subject": "KLoRASubjectLoader", "style": "KLoRAStyleLoader", "fuse": "KLoRAFuse"}[node]
    assert node_type in message, message
    if node in ("subject", "style"):
        assert f"{node} LoRA '{live.names[node]}'" in message, message
    assert "NaN values" not in message  # not blamed on the (valid) files


# --------------------------------------------------------------------------- 2. relative names

@pytest.fixture(scope="module")
def bad_files(live):
    from support import detectable_models

    sub = live.server.loras_dir / "hardening"
    sub.mkdir(exist_ok=True)
    detectable_models.write_corrupt_safetensors(sub / "broken.safetensors")
    detectable_models.write_pickle_bomb(sub / "payload.pt", sub / "never_written")
    return "hardening/broken.safetensors", "hardening/payload.pt"


@pytest.mark.parametrize("role", ["subject", "style"])
@pytest.mark.parametrize("which", [0, 1])
def test_preview_errors_name_files_relative_to_the_loras_folder(live, bad_files, role, which):
    bad = bad_files[which]
    params = {"subject": live.names["subject"], "style": live.names["style"], role: bad}
    status, body, _ = _get(live, "/klora/preview", params)
    assert status == 422, body
    message = json.loads(body)["error"]["message"]
    assert bad in message, message
    for folder in {str(live.server.loras_dir), str(live.server.loras_dir.resolve()), str(live.server.workdir)}:
        assert folder not in message, message
    assert "/tmp" not in message and not message.startswith("/"), message


# --------------------------------------------------------------------------- 3. /view during slow previews

SLOW_PAIRS = 8


def _slow_lora(path, seed: int) -> None:
    """Eight 2048 x 2048 attention projections at rank 64: about 2 s to score per pair on this machine."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(8):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q"
        sd[key + ".lora_down.weight"] = (torch.randn(64, 2048, generator=gen) * 0.05).half()
        sd[key + ".lora_up.weight"] = (torch.randn(2048, 64, generator=gen) * 0.05).half()
    save_file(sd, str(path))


def _view_seconds(live) -> float:
    started = time.monotonic()
    status, body, _ = _get(live, "/view", {"filename": live.names["image"], "type": "input"}, timeout=120)
    assert status == 200 and body[:4] == b"\x89PNG"
    return time.monotonic() - started


def test_view_stays_fast_while_slow_previews_queue(live):
    folder = live.server.loras_dir / "slow"
    folder.mkdir(exist_ok=True)
    _slow_lora(folder / "style.safetensors", 1)
    for i in range(SLOW_PAIRS):
        _slow_lora(folder / f"subject{i}.safetensors", 100 + i)
    baseline = min(_view_seconds(live) for _ in range(3))

    answers = [None] * SLOW_PAIRS

    def preview(i):
        params = {"subject": f"slow/subject{i}.safetensors", "style": "slow/style.safetensors", "map_steps": 4}
        answers[i] = _get(live, "/klora/preview", params, timeout=300)

    threads = [threading.Thread(target=preview, args=(i,)) for i in range(SLOW_PAIRS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # all requests have reached the server; at least one is scoring
    during = [_view_seconds(live) for _ in range(3)]
    for thread in threads:
        thread.join(timeout=300)
    assert max(during) < 2.0, f"/view took {max(during):.2f} s during the previews (alone: {baseline * 1000:.1f} ms)"

    statuses = sorted(status for status, _, _ in answers)
    assert 200 in statuses, statuses
    for status, body, headers in answers:
        if status != 200:  # the others are told to come back, never parked on a thread
            assert status == 503 and json.loads(body)["error"]["type"] == "busy", (status, body)
            assert int(headers.get("Retry-After", "0")) >= 1
    retry = next(i for i, (status, _, _) in enumerate(answers) if status == 503) if 503 in statuses else 0
    params = {"subject": f"slow/subject{retry}.safetensors", "style": "slow/style.safetensors", "map_steps": 4}
    for _ in range(60):  # a retry once the scoring is done gets the answer
        status, body, _ = _get(live, "/klora/preview", params, timeout=300)
        if status != 503:
            break
        time.sleep(1)
    assert status == 200 and json.loads(body)["counts"]["weights"] == 8, body


# --------------------------------------------------------------------------- 4. ComfyUI's validation errors

def test_a_partly_valid_prompt_is_rejected_in_one_line(live):
    """ComfyUI queues a graph when one of its outputs is valid and lists the rest in ``node_errors`` of a
    200 answer: ``run --sampler eulr`` used to print "seed 0 done", then "ComfyUI saved no image for node
    12".  The client now reports node, input, value and the allowed values (read from /object_info when
    ComfyUI leaves a list over 20 entries out), on one line."""
    from support.server_harness import PromptRejected

    from klora_core.cli.run_graphs import IDS

    graph = _graph(live, 4242, {("sampler", "sampler_name"): "eulr"})
    allowed = live.object_info["KSampler"]["input"]["required"]["sampler_name"][0]
    with pytest.raises(PromptRejected) as info:
        live.server.post_prompt(graph)
    message = str(info.value)
    assert "\n" not in message
    assert f"KSampler (node {IDS['sampler']}) input sampler_name = 'eulr': Value not in list" in message, message
    assert "allowed: " + ", ".join(allowed[:5]) in message, message
    assert len(allowed) > 20 and allowed[-1] in message, message
    assert IDS["sampler"] in info.value.node_errors
