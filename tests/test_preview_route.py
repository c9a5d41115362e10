"""/klora/preview and /klora/preview.png on a real ComfyUI server with this pack.

The route's answer must equal what ``klora_core.build_plan`` gives for the
same files, computed here independently (the standalone reader, attention
filter by name, the paper's schedule); every bad parameter must be a 400 with
a message that names it; names outside ComfyUI's loras list (paths, absolute
paths, ``..``) must be refused before any file is touched; scores must come
from the cache the second time.
"""
from __future__ import annotations

import io
import json
import math
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

from support import workflow_tools as wt
from klora_core import build_plan
from klora_core.lora_file import load_lora_file
from klora_core.weight_keys import is_attention_name

pytestmark = [pytest.mark.server]

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
EXTRA_SUBJECT = "klora-preview-extra-subject.safetensors"
EXTRA_STYLE = "klora-preview-extra-style.safetensors"


@pytest.fixture(scope="session")
def live(request):
    return wt.live_server(request)


@pytest.fixture(scope="session")
def extra_pair(live):
    """Demo LoRAs plus feed-forward modules both cover and a text-encoder module (for scope tests)."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(5)
    for source, target, rank in ((live.names["subject"], EXTRA_SUBJECT, 8), (live.names["style"], EXTRA_STYLE, 4)):
        sd = load_file(str(live.server.loras_dir / source))
        for module, out_f, in_f in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2", 320, 1280),
                                    ("lora_unet_down_blocks_0_attentions_0_proj_out", 320, 320),
                                    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)):
            sd[module + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) * 0.05).half()
            sd[module + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.05).half()
            sd[module + ".alpha"] = torch.tensor(float(rank)).half()
        save_file(sd, str(live.server.loras_dir / target))
    return EXTRA_SUBJECT, EXTRA_STYLE


def call(live, params=None, method="GET", body=None, path="/klora/preview", raw=False):
    """``(status, parsed JSON or bytes)``."""
    url = live.server.url + path
    data = None
    headers = {}
    if method == "GET" and params is not None:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    if method == "POST":
        data = body if isinstance(body, bytes) else json.dumps(params if body is None else body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            payload = response.read()
            status, ctype = response.status, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        payload, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    if raw or not ctype.startswith("application/json"):
        return status, payload, ctype
    return status, json.loads(payload), ctype


def expected(live, subject, style, *, subject_strength=1.0, style_strength=1.0, alpha=1.5, beta=None,
             pattern="s", scope="attention projections", steps=20):
    """What the route must answer, from klora_core alone."""
    s = load_lora_file(live.server.loras_dir / subject, subject_strength)
    t = load_lora_file(live.server.loras_dir / style, style_strength)
    s = {k: v for k, v in s.items() if not k.startswith(("te1_", "te2_"))}
    t = {k: v for k, v in t.items() if not k.startswith(("te1_", "te2_"))}
    if scope == "attention projections":
        s = {k: v for k, v in s.items() if is_attention_name(k)}
        t = {k: v for k, v in t.items() if is_attention_name(k)}
    plan = build_plan(s, t, alpha, beta, pattern)
    return plan, plan.selection(steps)


def assert_matches(answer, plan, selection, steps):
    assert answer["steps"] == steps
    assert answer["keys"] == list(selection)
    assert math.isclose(answer["gamma"], plan.gamma, rel_tol=1e-9)
    assert answer["beta"] == plan.beta and answer["alpha"] == plan.alpha and answer["pattern"] == plan.pattern
    rows = ["".join("1" if c else "0" for c in selection[k]) for k in selection]
    assert answer["selection"] == rows
    per_step = [sum(selection[k][i] for k in selection) for i in range(steps)]
    assert answer["counts"]["subject_per_step"] == per_step
    n = len(selection)
    assert answer["counts"]["weights"] == n
    assert answer["counts"]["first_step"] == {"subject": per_step[0], "style": n - per_step[0]}
    assert answer["counts"]["last_step"] == {"subject": per_step[-1], "style": n - per_step[-1]}
    groups = answer["groups"]
    assert sum(g["count"] for g in groups) == n and groups[0]["start"] == 0


def base(live, **extra):
    return {"subject": live.names["subject"], "style": live.names["style"], **extra}


def test_route_matches_build_plan(live):
    status, answer, _ = call(live, base(live, map_steps=20))
    assert status == 200, answer
    plan, selection = expected(live, live.names["subject"], live.names["style"], steps=20)
    assert_matches(answer, plan, selection, 20)
    assert answer["beta"] == 0.5  # beta -1 (the default) = the pattern's paper value
    # The demo pair flips: subject first, style last (the map is not one colour).
    assert answer["counts"]["first_step"]["subject"] > answer["counts"]["last_step"]["subject"]


@pytest.mark.parametrize("params", [
    {"pattern": "s*", "map_steps": 28},
    {"pattern": "s*", "alpha": 2.0, "beta": 1.7, "map_steps": 7},
    {"alpha": 3.25, "beta": 0.2, "subject_strength": 0.5, "style_strength": 2.0, "map_steps": 50},
    {"alpha": 0.0, "beta": 0.0, "map_steps": 1},
    {"subject_strength": -1.5, "map_steps": 150},
])
def test_route_matches_build_plan_for_other_settings(live, params):
    status, answer, _ = call(live, base(live, **{k: str(v) for k, v in params.items()}))
    assert status == 200, answer
    beta = params.get("beta")
    plan, selection = expected(live, live.names["subject"], live.names["style"], alpha=params.get("alpha", 1.5),
                               beta=None if beta is None or beta < 0 else beta, pattern=params.get("pattern", "s"),
                               subject_strength=params.get("subject_strength", 1.0),
                               style_strength=params.get("style_strength", 1.0), steps=params["map_steps"])
    assert_matches(answer, plan, selection, params["map_steps"])


def test_post_json_equals_get(live):
    params = base(live, alpha=2.5, beta=0.75, pattern="s", map_steps=12)
    status_get, by_get, _ = call(live, {k: str(v) for k, v in params.items()})
    status_post, by_post, _ = call(live, params, method="POST")
    assert status_get == status_post == 200
    by_get.pop("cached"), by_post.pop("cached")
    assert by_get == by_post


def test_scope_all_shared_weights(live, extra_pair):
    subject, style = extra_pair
    for scope in ("attention projections", "all shared weights"):
        status, answer, _ = call(live, {"subject": subject, "style": style, "scope": scope, "map_steps": "10"})
        assert status == 200, answer
        plan, selection = expected(live, subject, style, scope=scope, steps=10)
        assert_matches(answer, plan, selection, 10)
        keys = answer["keys"]
        assert not any(k.startswith("te") for k in keys), "text-encoder modules are never switched"
        if scope == "attention projections":
            assert len(keys) == 24 and answer["counts"]["outside_scope"] == 2
        else:
            assert len(keys) == 26 and answer["counts"]["outside_scope"] == 0
            assert any(k.endswith("ff_net_2") for k in keys) and any(k.endswith("proj_out") for k in keys)


def test_zero_strength_means_the_other_lora_everywhere(live):
    status, answer, _ = call(live, base(live, subject_strength="0", map_steps="5"))
    assert status == 200, answer
    assert answer["gamma"] is None and set(answer["selection"]) == {"00000"} and answer["notes"]
    status, answer, _ = call(live, base(live, style_strength="0", map_steps="5"))
    assert set(answer["selection"]) == {"11111"}


def test_cache_hit_on_repeat_and_miss_on_new_content(live):
    from safetensors.torch import load_file, save_file

    # Content no other test uses (the cache is keyed by the files' SHA-256, not their names).
    copy_name = "klora-preview-cache-style.safetensors"
    sd = load_file(str(live.server.loras_dir / live.names["style"]))
    key = next(k for k in sorted(sd) if k.endswith(".lora_up.weight"))
    sd[key] = sd[key] * 2
    save_file(sd, str(live.server.loras_dir / copy_name))
    params = {"subject": live.names["subject"], "style": copy_name, "map_steps": "9"}
    status, first, _ = call(live, params)
    assert status == 200 and first["cached"] is False
    # Strengths, schedule and steps never rescore.
    status, again, _ = call(live, {**params, "alpha": "2.0", "pattern": "s*", "subject_strength": "3"})
    assert status == 200 and again["cached"] is True
    status, same, _ = call(live, params)
    assert status == 200 and same["cached"] is True and same["selection"] == first["selection"]
    # The same bytes under another name: still a hit.
    save_file(sd, str(live.server.loras_dir / ("renamed-" + copy_name)))
    status, renamed, _ = call(live, {**params, "style": "renamed-" + copy_name})
    assert status == 200 and renamed["cached"] is True
    # New content under the same name: scored again.
    sd[key] = sd[key] * 4
    save_file(sd, str(live.server.loras_dir / copy_name))
    status, changed, _ = call(live, params)
    assert status == 200 and changed["cached"] is False


@pytest.mark.parametrize("param, value, fragment", [
    ("alpha", "nan", "finite"),
    ("alpha", "inf", "finite"),
    ("alpha", "-0.5", "between 0 and 10"),
    ("alpha", "10.5", "between 0 and 10"),
    ("alpha", "abc", "must be a number"),
    ("alpha", "", "must be a number"),
    ("beta", "-2", "between -1 and 10"),
    ("beta", "1e999", "finite"),
    ("subject_strength", "101", "between -100 and 100"),
    ("style_strength", "x", "must be a number"),
    ("map_steps", "0", "between 1 and 150"),
    ("map_steps", "151", "between 1 and 150"),
    ("map_steps", "2.5", "must be an integer"),
    ("map_steps", "ten", "must be an integer"),
    ("pattern", "s**", "must be one of"),
    ("scope", "everything", "must be one of"),
    ("colour", "red", "unknown parameter"),
])
def test_bad_parameters_are_400(live, param, value, fragment):
    status, answer, _ = call(live, base(live, **{param: value}))
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert fragment in answer["error"]["message"], answer


@pytest.mark.parametrize("body, param, fragment", [
    ({"alpha": True}, "alpha", "must be a number"),
    ({"alpha": "1.5"}, "alpha", "must be a number"),
    ({"map_steps": 3.5}, "map_steps", "must be an integer"),
    ({"map_steps": None, "subject": 5}, "subject", "must be a string"),
    ({"pattern": ["s"]}, "pattern", "must be one of"),
])
def test_bad_json_types_are_400(live, body, param, fragment):
    status, answer, _ = call(live, method="POST", body={**base(live), **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param and fragment in answer["error"]["message"], answer


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"'])
def test_bad_json_bodies_are_400(live, raw):
    status, answer, _ = call(live, method="POST", body=raw)
    assert status == 400 and answer["error"]["message"], answer


def test_missing_names_and_repeated_parameters(live):
    status, answer, _ = call(live, {"style": live.names["style"]})
    assert status == 400 and answer["error"]["param"] == "subject" and "required" in answer["error"]["message"]
    status, answer, _ = call(live, [("subject", live.names["subject"]), ("style", live.names["style"]),
                                    ("alpha", "1"), ("alpha", "2")])
    assert status == 400 and "more than once" in answer["error"]["message"]
    status, answer, _ = call(live, base(live, alpha="1"), method="POST", path="/klora/preview?alpha=2")
    assert status == 400 and "not both" in answer["error"]["message"]


@pytest.mark.parametrize("name", [
    "../loras/{subject}",
    "..",
    "sub/../../{subject}",
    "..\\{subject}",
    "/etc/passwd",
    "{loras_dir}/{subject}",
    "C:\\Windows\\win.ini",
    "~/x.safetensors",
    "nope.safetensors",
    "{subject}.missing",
    " ",
])
def test_paths_and_unknown_names_are_refused(live, name):
    name = name.format(subject=live.names["subject"], loras_dir=live.server.loras_dir)
    for role in ("subject", "style"):
        params = base(live)
        params[role] = name
        status, answer, _ = call(live, params)
        assert status == 400, (name, answer)
        assert answer["error"]["param"] == role
        message = answer["error"]["message"]
        assert "loras folder" in message or "empty" in message, message
        status, answer, _ = call(live, params, path="/klora/preview.png")
        assert status == 400, (name, answer)


def test_files_that_cannot_be_fused_are_422(live):
    from support import detectable_models

    detectable_models.write_flux_lora(live.server.loras_dir / "klora-preview-flux.safetensors")
    status, answer, _ = call(live, base(live, style="klora-preview-flux.safetensors"))
    assert status == 422 and "share no" in answer["error"]["message"], answer
    detectable_models.write_corrupt_safetensors(live.server.loras_dir / "klora-preview-corrupt.safetensors")
    status, answer, _ = call(live, base(live, subject="klora-preview-corrupt.safetensors"))
    assert status == 422 and "klora-preview-corrupt.safetensors" in answer["error"]["message"], answer


def test_pickles_follow_the_one_reader_policy(live, tmp_path):
    """A .pt of plain tensors previews like its .safetensors twin (torch weights-only loader); a .pt that
    would run code is a 422 with the reader's own words (klora_core.safe_load), and never runs."""
    from safetensors.torch import load_file

    from klora_core.errors import KLoRAError
    from klora_core.safe_load import load_tensors

    loras = live.server.loras_dir
    torch.save(load_file(str(loras / live.names["subject"])), loras / "klora-preview-subject.pt")
    status, answer, _ = call(live, base(live, subject="klora-preview-subject.pt", map_steps="12"))
    assert status == 200, answer
    plan, selection = expected(live, live.names["subject"], live.names["style"], steps=12)
    assert_matches(answer, plan, selection, 12)

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = loras / "klora-preview-payload.pt"
    torch.save({"x": Payload()}, payload)
    with pytest.raises(KLoRAError) as said:
        load_tensors(payload, "subject LoRA 'klora-preview-payload.pt'")
    status, answer, _ = call(live, base(live, subject=payload.name))
    # the route names files as ComfyUI lists them, never by the server's folders
    assert status == 422 and answer["error"]["message"] == str(said.value).replace(str(payload), payload.name), answer
    assert not marker.exists()


def test_png(live):
    from PIL import Image

    status, payload, ctype = call(live, base(live, map_steps="16", pattern="s*"), path="/klora/preview.png")
    assert status == 200 and ctype == "image/png"
    image = Image.open(io.BytesIO(payload))
    grid = json.loads(image.info["klora:grid"])
    assert grid["steps"] == 16
    _, selection = expected(live, live.names["subject"], live.names["style"], pattern="s*", steps=16)
    assert [row[0] for row in grid["rows"]] == list(selection)
    rgb = image.convert("RGB")
    colours = {True: (0x00, 0x72, 0xB2), False: (0xE6, 0x9F, 0x00)}
    for key, y in grid["rows"]:
        for i, choice in enumerate(selection[key]):
            assert rgb.getpixel((grid["x0"] + i * grid["pitch_x"], y)) == colours[choice]
    status, answer, _ = call(live, base(live, map_steps="0"), path="/klora/preview.png")
    assert status == 400 and answer["error"]["param"] == "map_steps"


def test_api_prefix_and_server_stays_responsive(live):
    status, answer, _ = call(live, base(live, map_steps="4"), path="/api/klora/preview")
    assert status == 200 and answer["steps"] == 4
    assert "K-LoRA preview failed" not in live.server.log_text(), "the preview route hit an unexpected error"


def test_in_process_import_registers_nothing(klora_pack):
    """Without a running PromptServer (tests import the pack in-process) the route module is inert."""
    import importlib

    routes = importlib.import_module("klora_pack.nodes.routes")
    assert routes.REGISTERED is False
    assert routes.register(object()) is False  # an object without .routes


@pytest.mark.parametrize("settings", [
    {"pattern": "s", "alpha": 1.5, "beta": -1.0, "steps": 20},
    {"pattern": "s*", "alpha": 1.5, "beta": 1.275, "steps": 28, "subject_strength": 0.7},
])
def test_preview_equals_the_nodes_own_plan(live, klora_pack, settings):
    """The route (files alone, canonical names) chooses exactly what K-LoRA Fuse chooses on the real model."""
    import comfy.sd
    from klora_core.cli import demo_models
    from klora_pack.nodes.fuse import fuse_model
    from klora_pack.nodes.handles import make_handle

    names, loras = live.names, live.server.loras_dir
    model = comfy.sd.load_diffusion_model(str(live.server.unet_dir / names["unet"]))
    s_strength = settings.get("subject_strength", 1.0)
    subject = make_handle("subject", names["subject"], str(loras / names["subject"]), s_strength)
    style = make_handle("style", names["style"], str(loras / names["style"]), 1.0)
    result = fuse_model(model, subject, style, alpha=settings["alpha"], beta=settings["beta"],
                        pattern=settings["pattern"])
    steps = settings["steps"]
    node_selection = result.plan.selection(steps)
    status, answer, _ = call(live, base(live, pattern=settings["pattern"], alpha=str(settings["alpha"]),
                                        beta=str(settings["beta"]), subject_strength=str(s_strength),
                                        map_steps=str(steps)))
    assert status == 200, answer
    assert math.isclose(answer["gamma"], result.plan.gamma, rel_tol=1e-6)
    preview_rows = dict(zip(answer["keys"], answer["selection"]))
    # demo_models knows which model weight each kohya module patches.
    pairs = {kohya[len("lora_unet_"):]: key for kohya, key, _o, _i in demo_models.attention_targets()}
    assert set(preview_rows) == set(pairs)
    for canonical, model_key in pairs.items():
        node_key = next(k for k in node_selection if (k if isinstance(k, str) else k[0]) == model_key)
        node_row = "".join("1" if c else "0" for c in node_selection[node_key])
        assert preview_rows[canonical] == node_row, canonical


def test_options_route_gives_the_frontend_the_paper_values(live):
    """web/klora.js switches beta with the pattern using these (the paper's values, docs/method.md)."""
    status, answer, _ = call(live, path="/klora/options")
    assert status == 200
    assert answer["pattern_beta"] == {"s": 0.5, "s*": 1.275}
    assert answer["beta"] == {"min": -1.0, "max": 10.0, "default": 0.5}
    assert answer["map_steps"] == {"min": 1, "max": 150, "default": 20}


def test_omitted_beta_is_the_patterns_value(live):
    """Omitted (or negative, as 0.1.0 workflows hold) beta is the pattern's paper value, not a fixed default."""
    for pattern, value in (("s", 0.5), ("s*", 1.275)):
        for extra in ({}, {"beta": -1}, {"beta": -0.5}):
            status, answer, _ = call(live, base(live, pattern=pattern, **extra))
            assert status == 200 and answer["beta"] == value, (pattern, extra, answer.get("beta"))
