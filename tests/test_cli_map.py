"""The ``python -m klora_core map`` command line, end to end, without ComfyUI.

The expected subject/style choices are computed here from the method's formulas
(docs/method.md, "Definitions" to "The decision") on the
tensors read straight from the files with safetensors, in float64, without
calling ``build_plan`` or ``klora_core.lora_file``.  They are compared with
the CLI's table and with the pixels of the PNG it writes.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
BLUE = (0x00, 0x72, 0xB2)  # subject
ORANGE = (0xE6, 0x9F, 0x00)  # style

# Runs the CLI exactly like ``python -m klora_core`` and fails if ComfyUI got imported.
_RUNNER = (
    "import runpy, sys\n"
    "sys.argv = ['klora_core'] + sys.argv[1:]\n"
    "code = 0\n"
    "try:\n"
    "    runpy.run_module('klora_core', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as exc:\n"
    "    code = exc.code or 0\n"
    "bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_')) or m == 'folder_paths')\n"
    "if bad:\n"
    "    sys.stderr.write('ComfyUI imported: %s\\n' % bad)\n"
    "    code = 99\n"
    "sys.exit(code)\n"
)


def run_cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- independent reference -------------------------------------------------------------

def spec_scores(pairs):
    """``({name: [T_S, T_T, L1_S, L1_T]}, gamma)`` from the method's formulas (docs/method.md), in float64.

    ``pairs``: ``{name: ((up_S, down_S, scale_S), (up_T, down_T, scale_T))}``.
    """
    stats = {}
    for name, (s, t) in pairs.items():
        deltas, ranks = [], []
        for up, down, scale in (s, t):
            up, down = up.double().flatten(1), down.double().flatten(1)
            deltas.append((scale * (up @ down)).abs().flatten())
            ranks.append(down.shape[0])
        k = min(ranks[0] * ranks[1], deltas[0].numel())
        stats[name] = [float(d.topk(k).values.sum()) for d in deltas] + [float(d.sum()) for d in deltas]
    ratios = [l1s / l1t for _, _, l1s, l1t in stats.values()]
    first = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * first]
    return stats, sum(kept) / len(kept)


def spec_selection(pairs, steps, alpha, beta, pattern):
    """``{name: "SSTT..."}`` from the method's formulas (docs/method.md).

    ``pairs``: ``{name: ((up_S, down_S, scale_S), (up_T, down_T, scale_T))}``.
    """
    stats, gamma = spec_scores(pairs)
    out = {}
    for name, (ts, tt, _, _) in stats.items():
        marks = []
        for i in range(steps):
            scale = alpha * (i / steps) + beta
            if pattern == "s*":
                scale = math.fmod(scale, alpha)
            lhs, rhs = ts / gamma, tt * scale
            assert abs(lhs - rhs) > 1e-4 * max(lhs, rhs), f"near tie at {name} step {i}: pick another seed"
            marks.append("S" if lhs > rhs else "T")
        out[name] = "".join(marks)
    return out


def read_kohya(path, prefix="lora_unet_"):
    """``{module: (up, down, alpha/rank)}`` of a kohya file, parsed here by suffix."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            m = key[: -len(".lora_down.weight")]
            down, up = sd[key], sd[m + ".lora_up.weight"]
            scale = float(sd[m + ".alpha"]) / down.shape[0] if m + ".alpha" in sd else 1.0
            out[m[len(prefix):]] = (up, down, scale)
    return out


def parse_table(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and set(parts[4]) <= {"S", "T"} and parts[0] != "weight":
            rows[parts[0]] = parts[4]
    return rows


def check_png(path, expected, steps, order=None):
    """The PNG's cells match ``expected`` ({key: "ST..."}) cell by cell and in pixel counts."""
    from PIL import Image

    assert path.is_file()
    with Image.open(path) as im:
        im.load()
        grid = json.loads(im.info["klora:grid"])
        rgb = im.convert("RGB")
    w, h = rgb.size
    assert 300 <= w <= 2000 and 300 <= h <= 2500, (w, h)
    assert grid["steps"] == steps
    assert grid["x0"] + steps * grid["pitch_x"] <= w
    keys = [k for k, _ in grid["rows"]]
    assert sorted(keys) == sorted(expected)
    if order is not None:
        assert keys == order
    cw, ch = grid["cell_w"], grid["cell_h"]
    assert cw >= 4 and ch >= 4  # readable cells for these small plans
    px = rgb.load()
    for key, y in grid["rows"]:
        for i, mark in enumerate(expected[key]):
            x = grid["x0"] + i * grid["pitch_x"]
            want = BLUE if mark == "S" else ORANGE
            for dx, dy in ((0, 0), (cw - 1, ch - 1), (cw // 2, ch // 2)):
                assert px[x + dx, y + dy] == want, (key, i)
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    blue = int((data == torch.tensor(BLUE, dtype=torch.uint8)).all(-1).sum())
    orange = int((data == torch.tensor(ORANGE, dtype=torch.uint8)).all(-1).sum())
    n_s = sum(m.count("S") for m in expected.values())
    n_t = sum(m.count("T") for m in expected.values())
    sw = grid["legend"]["subject"][2] * grid["legend"]["subject"][3]
    tw = grid["legend"]["style"][2] * grid["legend"]["style"][3]
    assert blue == n_s * cw * ch + sw
    assert orange == n_t * cw * ch + tw


# --- the demo pair --------------------------------------------------------------------

def test_demo_map_and_table(tmp_path):
    out = tmp_path / "out" / "map.png"
    res = run_cli("map", "--out", out, "--table", "--steps", 20, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    subject_file, style_file = tmp_path / "out" / "demo_subject.safetensors", tmp_path / "out" / "demo_style.safetensors"
    assert subject_file.is_file() and style_file.is_file()
    s, t = read_kohya(subject_file), read_kohya(style_file)
    assert s.keys() == t.keys() and len(s) == 24  # the pair scripts/demo.sh renders with
    assert {v[1].shape[0] for v in s.values()} != {v[1].shape[0] for v in t.values()}  # different ranks
    expected = spec_selection({k: (s[k], t[k]) for k in s}, 20, 1.5, 0.5, "s")
    # The demo exists to show both colours and flips at various steps.
    assert any("S" in m and "T" in m for m in expected.values())
    assert len({m.find("T") for m in expected.values() if "S" in m and "T" in m}) >= 5
    assert parse_table(res.stdout) == expected
    first_s = sum(m[0] == "S" for m in expected.values())
    last_s = sum(m[-1] == "S" for m in expected.values())
    assert f"first step (i=0): {first_s} subject, {24 - first_s} style" in res.stdout
    assert f"last step (i=19): {last_s} subject, {24 - last_s} style" in res.stdout
    check_png(out, expected, 20)


def test_demo_s_star_inspect_alias(tmp_path):
    from klora_core.cli import main as cli

    out = tmp_path / "star.png"
    assert cli.main(["inspect", "--out", str(out), "--pattern", "s*", "--steps", "12", "--alpha", "1.4", "--beta", "1.1"]) == 0
    s, t = read_kohya(tmp_path / "demo_subject.safetensors"), read_kohya(tmp_path / "demo_style.safetensors")
    expected = spec_selection({k: (s[k], t[k]) for k in s}, 12, 1.4, 1.1, "s*")
    check_png(out, expected, 12)


# --- a kohya subject against a PEFT style of the same layers --------------------------

LAYERS = [  # diffusers module name, out, in, attention?
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 24, 24, True),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 24, 24, True),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 24, 24, True),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 24, 24, True),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 24, 16, True),
    ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", 24, 96, False),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 48, 48, True),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 48, 16, True),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", 48, 48, True),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k", 32, 32, True),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q", 32, 32, True),
    ("up_blocks.10.attentions.0.transformer_blocks.0.attn1.to_v", 16, 16, True),  # numeric order, not text order
]
CONV = ("down_blocks.0.resnets.0.conv1", 24, 24)  # LoCon, 3x3
SUBJECT_RANK, SUBJECT_ALPHA, STYLE_RANK = 6, 3.0, 4


@pytest.fixture
def kohya_peft_pair(tmp_path):
    gen = torch.Generator().manual_seed(11)
    kohya, peft, pairs = {}, {}, {}
    for i, (name, out_f, in_f, _attn) in enumerate(LAYERS + [CONV + (False,)]):
        conv = name == CONV[0]
        mag = 0.4 + 2.0 * float(torch.rand(1, generator=gen))
        s_down = torch.randn(SUBJECT_RANK, in_f, *((3, 3) if conv else ()), generator=gen)
        s_up = torch.randn(out_f, SUBJECT_RANK, *((1, 1) if conv else ()), generator=gen) * mag
        t_down = torch.randn(STYLE_RANK, in_f, *((3, 3) if conv else ()), generator=gen)
        t_up = torch.randn(out_f, STYLE_RANK, *((1, 1) if conv else ()), generator=gen)
        k = "lora_unet_" + name.replace(".", "_")
        kohya[k + ".lora_down.weight"], kohya[k + ".lora_up.weight"] = s_down.half(), s_up.half()
        alpha = SUBJECT_ALPHA + i % 4  # per-module alpha: ignoring it would change the choices
        kohya[k + ".alpha"] = torch.tensor(alpha)
        p = "base_model.model." + name
        peft[p + ".lora_A.weight"], peft[p + ".lora_B.weight"] = t_down.half(), t_up.half()
        pairs[name.replace(".", "_")] = ((s_up.half(), s_down.half(), alpha / SUBJECT_RANK),
                                         (t_up.half(), t_down.half(), 1.0))
    # One module only the subject covers.
    kohya["lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.randn(SUBJECT_RANK, 32).half()
    kohya["lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.randn(32, SUBJECT_RANK).half()
    save_file(kohya, str(tmp_path / "subject_kohya.safetensors"))
    save_file(peft, str(tmp_path / "style_peft.safetensors"))
    return tmp_path / "subject_kohya.safetensors", tmp_path / "style_peft.safetensors", pairs


def test_kohya_and_peft_pair_up(tmp_path, kohya_peft_pair):
    subject, style, pairs = kohya_peft_pair
    attention = {n.replace(".", "_") for n, *_, a in LAYERS if a}
    expected = spec_selection({k: v for k, v in pairs.items() if k in attention}, 16, 1.5, 0.5, "s")
    out = tmp_path / "pair.png"
    res = run_cli("map", subject, style, "--steps", 16, "--out", out, "--table", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert parse_table(res.stdout) == expected
    assert "only in subject LoRA: 1; only in style LoRA: 0" in res.stdout
    order = [n.replace(".", "_") for n, *_, a in LAYERS if a]  # model order, as generated
    check_png(out, expected, 16, order=order)


def test_scope_all_includes_mlp_and_locon(tmp_path, kohya_peft_pair):
    from klora_core.cli import main as cli

    subject, style, pairs = kohya_peft_pair
    expected = spec_selection(pairs, 10, 1.5, 0.5, "s")
    out = tmp_path / "all.png"
    assert cli.main(["map", str(subject), str(style), "--steps", "10", "--scope", "all", "--out", str(out)]) == 0
    check_png(out, expected, 10)


def test_strength_does_not_change_the_choice(tmp_path, kohya_peft_pair, capsys):
    from klora_core.cli import main as cli

    subject, style, _ = kohya_peft_pair
    tables = []
    for strength in ("1", "0.3"):
        assert cli.main(["map", str(subject), str(style), "--subject-strength", strength,
                         "--out", str(tmp_path / "x.png"), "--table"]) == 0
        tables.append({k: v for k, v in parse_table(capsys.readouterr().out).items()})
    assert tables[0] == tables[1]


# --- errors ---------------------------------------------------------------------------

def _one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("klora: error: ")
    return lines[0]


def test_missing_file_exits_nonzero(tmp_path):
    res = run_cli("map", tmp_path / "nope.safetensors", tmp_path / "nope2.safetensors", "--out", tmp_path / "m.png", cwd=tmp_path)
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert "nope.safetensors" in line and "file not found" in line
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad_json"])
def test_corrupt_file_exits_nonzero(tmp_path, capsys, damage):
    from klora_core.cli import main as cli
    from klora_core.cli.demo_pair import save_demo_pair

    good, style = save_demo_pair(tmp_path / "demo")
    bad = tmp_path / f"{damage}.safetensors"
    data = Path(good).read_bytes()
    bad.write_bytes({
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 8,
        "empty": b"",
        "bad_json": len(b"{not json}").to_bytes(8, "little") + b"{not json}",
    }[damage])
    assert cli.main(["map", str(bad), style, "--out", str(tmp_path / "m.png")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert bad.name in line


class _Marker:
    """Unpickling this creates a file: proves a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["subject.pt", "subject.ckpt", "pickle_in_disguise.safetensors"])
def test_pickle_files_are_refused_unloaded(tmp_path, capsys, name):
    from klora_core.cli import main as cli
    from klora_core.cli.demo_pair import save_demo_pair

    _, style = save_demo_pair(tmp_path / "demo")
    marker = tmp_path / "unpickled"
    bad = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"x": _Marker(str(marker))}, bad)
    else:
        bad.write_bytes(pickle.dumps({"x": _Marker(str(marker))}, protocol=2))
    assert cli.main(["map", str(bad), style, "--out", str(tmp_path / "m.png")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert name in line and "convert" in line
    assert not marker.exists()


def test_usage_errors(tmp_path, capsys):
    from klora_core.cli import main as cli

    for argv in (["map", "--steps", "0"], ["map", "--pattern", "x"], ["map", "--alpha", "nan"], []):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        _one_line(capsys.readouterr().err)
    assert cli.main(["map", str(tmp_path / "only_one.safetensors"), "--out", str(tmp_path / "m.png")]) == 2
    assert "both SUBJECT and STYLE" in _one_line(capsys.readouterr().err)
    assert cli.main(["map", "--out", str(tmp_path / "m.jpg")]) == 2
    assert "--out" in _one_line(capsys.readouterr().err)


def test_help_documents_everything(capsys):
    from klora_core.cli import main as cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["map", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("SUBJECT", "STYLE", "--steps", "--alpha", "--beta", "--pattern", "--out", "--table",
                 "--scope", "--subject-strength", "--style-strength", "--seed", "demo", "safetensors", "Exit status"):
        assert word in text, word


# --- the reader on its own ------------------------------------------------------------

@pytest.mark.parametrize("raw, canonical", [
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k", "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"),
    ("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"),
    ("base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"),
    ("unet.up_blocks.0.attentions.1.transformer_blocks.3.attn1.processor.to_out", "up_blocks_0_attentions_1_transformer_blocks_3_attn1_to_out_0"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_input_blocks_8_1_proj_in", "down_blocks_2_attentions_1_proj_in"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v", "mid_block_attentions_0_transformer_blocks_9_attn2_to_v"),
    ("lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2", "up_blocks_1_attentions_2_transformer_blocks_1_ff_net_2"),
    ("lora_unet_output_blocks_2_1_conv", "output_blocks_2_1_conv"),  # an upsampler, not attention
    ("transformer.single_transformer_blocks.3.attn.to_k", "single_transformer_blocks_3_attn_to_k"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "te1_text_model_encoder_layers_0_self_attn_q_proj"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "te2_text_model_encoder_layers_0_mlp_fc1"),
])
def test_canonical_names(raw, canonical):
    from klora_core.lora_file import canonical_module_name

    assert canonical_module_name(raw) == canonical


def test_formats_families_and_scaling():
    from klora_core.errors import KLoRAError
    from klora_core.lora_file import detect_family, detect_format, lora_modules

    up, down = torch.randn(8, 4), torch.randn(4, 2048)
    kohya = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": up,
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": down,
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(2.0)}
    diffusers = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": up,
                 "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": down}
    old = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": up,
           "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": down}
    peft = {"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": down,
            "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": up}
    assert [detect_format(sd) for sd in (kohya, diffusers, old, peft, {"x.weight": up})] == \
        ["kohya", "diffusers", "diffusers", "peft", "unknown"]
    name = "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    for sd, scale in ((kohya, 0.5 * 3), (diffusers, 3), (old, 3), (peft, 3)):
        mods = lora_modules(sd, strength=3)
        assert list(mods) == [name]
        assert torch.allclose(mods[name][0], up * scale) and torch.equal(mods[name][1], down)
    assert detect_family(kohya) == "sdxl"  # context width 2048
    assert detect_family(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]) == "sd15"
    assert detect_family(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "flux"
    assert detect_family(["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]) == "sdxl"
    assert detect_family(["something.lora_down.weight"]) == "unknown"
    with pytest.raises(KLoRAError, match="no up weight"):
        lora_modules({"a.lora_down.weight": down}, source="f.safetensors")
    with pytest.raises(KLoRAError, match="no LoRA weights"):
        lora_modules({"a.hada_w1_a": down}, source="f.safetensors")
    with pytest.raises(KLoRAError, match="different ranks"):
        lora_modules({"a.lora_down.weight": down, "a.lora_up.weight": torch.randn(8, 3)}, source="f.safetensors")


def test_table_and_map_from_library(tmp_path):
    """render_selection_map / selection_table agree with each other on a plan built in-process."""
    from klora_core import build_plan
    from klora_core.cli.demo_models import make_lora_pair
    from klora_core.lora_file import lora_modules
    from klora_core.render import render_selection_map, selection_table

    s, t = make_lora_pair(seed=3)
    plan = build_plan(lora_modules(s), lora_modules(t), pattern="s*")
    table = parse_table(selection_table(plan, 24))
    image = render_selection_map(plan, 24, path=tmp_path / "lib.png", title="custom title",
                                 group_fn=lambda key: key.split("_attentions")[0])
    assert image.mode == "RGB"
    check_png(tmp_path / "lib.png", table, 24, order=list(plan.keys))
