"""``python -m klora_core inspect``: the headless report, checked against the method (docs/method.md).

Every expected number here (T_S, T_T, K, gamma, the per-step choice) is
computed in this file, in float64, from the tensors as written to disk and
the formulas of docs/method.md ("Definitions", "Global balance gamma",
"The time-dependent style factor", "The decision"), without ``build_plan``,
``klora_core.lora_file`` or any other product code.  The CLI runs in a
subprocess exactly as a user would start it, without ComfyUI.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
SUBJECT_COLOR = (0x00, 0x72, 0xB2)
STYLE_COLOR = (0xE6, 0x9F, 0x00)

# (diffusers module path, out, in).  Attention projections of an SD1.5-shaped UNet
# (cross-attention keys/values read the 768-wide CLIP-L context, which is how the
# family is recognised), shrunk where the width does not matter.
SHARED_ATTENTION = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 32, 32),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 32, 32),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 32, 32),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 32, 32),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 32, 768),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 32, 768),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 48, 48),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", 40, 40),
    ("up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v", 4, 4),  # 16 entries < r_S * r_T: K is capped
]
OUTLIER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"  # subject x30: its ratio gets trimmed
SHARED_OTHER = [("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", 32, 128)]  # outside --scope attention
SUBJECT_ONLY = [("down_blocks.0.attentions.0.proj_in", 32, 32),  # model order: listed this way
                ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", 40, 40)]
STYLE_ONLY = [("mid_block.attentions.0.transformer_blocks.0.attn2.to_q", 48, 48)]
R_S, R_T = 6, 4


def canon(name: str) -> str:
    return name.replace(".", "_")


def run_cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "klora_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- the LoRA pair and the independent reference --------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A kohya subject (rank 6, per-module alpha) and a PEFT style (rank 4, no alpha) file.

    Returns (subject_path, style_path, refs) with refs = {canonical key: (dS, dT, r_S, r_T)} of the
    shared attention weights; the deltas are float64 and already scaled as docs/method.md says.
    """
    folder = tmp_path_factory.mktemp("inspect_pair")
    gen = torch.Generator().manual_seed(20250218)
    kohya, peft, refs = {}, {}, {}

    def factors(rank, out_f, in_f, gain):
        return (torch.randn(out_f, rank, generator=gen) * gain).half(), torch.randn(rank, in_f, generator=gen).half()

    for i, (name, out_f, in_f) in enumerate(SHARED_ATTENTION + SHARED_OTHER + SUBJECT_ONLY + STYLE_ONLY):
        k = "lora_unet_" + canon(name)
        if (name, out_f, in_f) not in STYLE_ONLY:
            gain = (30.0 if name == OUTLIER else 1.0) * (0.5 + 0.25 * (i % 5))
            up, down = factors(R_S, out_f, in_f, gain)
            alpha = float(2 + i % 3)  # per-module alpha: ignoring it would change T_S and gamma
            kohya[k + ".lora_up.weight"], kohya[k + ".lora_down.weight"] = up, down
            kohya[k + ".alpha"] = torch.tensor(alpha)
            d_s = (alpha / R_S) * (up.double() @ down.double())
        if (name, out_f, in_f) not in SUBJECT_ONLY:
            up_t, down_t = factors(R_T, out_f, in_f, 0.2 + 0.1 * (i % 7))
            p = "base_model.model." + name
            peft[p + ".lora_B.weight"], peft[p + ".lora_A.weight"] = up_t, down_t
            d_t = up_t.double() @ down_t.double()  # PEFT without alpha: alpha = rank, scale 1
        if (name, out_f, in_f) in SHARED_ATTENTION:
            refs[canon(name)] = (d_s, d_t, R_S, R_T)
    subject, style = folder / "subject_kohya.safetensors", folder / "style_peft.safetensors"
    save_file(kohya, str(subject))
    save_file(peft, str(style))
    return subject, style, refs


def reference(refs, steps, alpha, beta, pattern, s_strength=1.0, t_strength=1.0):
    """The spec, in float64: per-key (K, T_S, T_T), the ratios, gamma, dropped count, choices."""
    rows, ratios = {}, []
    for key, (d_s, d_t, r_s, r_t) in refs.items():
        d_s, d_t = d_s * s_strength, d_t * t_strength
        k = min(r_s * r_t, d_s.numel())
        a_s, a_t = d_s.abs().flatten(), d_t.abs().flatten()
        t_s = float(a_s.sort(descending=True).values[:k].sum())
        t_t = float(a_t.sort(descending=True).values[:k].sum())
        rows[key] = (k, t_s, t_t)
        ratios.append(float(a_s.sum()) / float(a_t.sum()))
    first = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * first]
    gamma = sum(kept) / len(kept)
    choices = {}
    for key, (k, t_s, t_t) in rows.items():
        marks = ""
        for i in range(steps):
            p = i / steps
            scale = alpha * p + beta
            if pattern == "s*":
                scale = math.fmod(scale, alpha)
            lhs, rhs = t_s / gamma, t_t * scale
            assert abs(lhs - rhs) > 1e-6 * max(lhs, rhs), f"near tie at {key} step {i}; change the seed"
            marks += "S" if lhs > rhs else "T"
        choices[key] = marks
    return rows, first, len(ratios) - len(kept), gamma, choices


# --- parsing the report -----------------------------------------------------------------

def parse(stdout):
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("weight "))
    assert lines[head].split()[:7] == ["weight", "r_S", "r_T", "K", "T_S", "T_T", "T_S/(g*T_T)"]
    table = {}
    for line in lines[head + 1:]:
        parts = line.split()
        if len(parts) != 8 or not set(parts[7]) <= {"S", "T"}:
            break
        table[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]), float(parts[4]), float(parts[5]),
                           float(parts[6]), parts[7])

    def block(title):
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        out = []
        for line in lines[start + 1:]:
            if not line.startswith("  "):
                break
            out.append(line.strip())
        return [] if out == ["(none)"] else out

    gamma_line = next(line for line in lines if line.startswith("gamma = "))
    return {
        "lines": lines, "table": table, "gamma_line": gamma_line,
        "gamma": float(gamma_line.split()[2]),
        "only_subject": block("only in the subject LoRA"),
        "only_style": block("only in the style LoRA"),
        "outside": block("in both LoRAs but outside --scope"),
    }


def check_png(path, choices, steps):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        grid = json.loads(im.info["klora:grid"])
        rgb = im.convert("RGB")
    px = rgb.load()
    assert grid["steps"] == steps
    assert [k for k, _ in grid["rows"]] == list(choices)
    for key, y in grid["rows"]:
        for i, mark in enumerate(choices[key]):
            x = grid["x0"] + i * grid["pitch_x"]
            want = SUBJECT_COLOR if mark == "S" else STYLE_COLOR
            assert px[x + grid["cell_w"] // 2, y + grid["cell_h"] // 2] == want, (key, i)


def close(a, b, rel=2e-5):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# --- tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, steps, alpha, beta", [("s", 20, 1.5, 0.5), ("s*", 13, 1.4, 1.2)])
def test_inspect_report_matches_the_spec(tmp_path, pair, pattern, steps, alpha, beta):
    subject, style, refs = pair
    rows, first_mean, dropped, gamma, choices = reference(refs, steps, alpha, beta, pattern)
    assert dropped >= 1 and any("S" in m and "T" in m for m in choices.values())  # the fixture tests something
    out, js = tmp_path / "m" / "map.png", tmp_path / "m" / "report.json"
    res = run_cli("inspect", subject, style, "--steps", steps, "--pattern", pattern, "--alpha", alpha,
                  "--beta", beta, "--out", out, "--json", js, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    rep = parse(res.stdout)
    text = res.stdout

    # formats and family, per file and together
    assert f"subject LoRA: {subject}" in text and f"style LoRA: {style}" in text
    fmt_lines = [line.strip() for line in rep["lines"] if line.startswith("  format ")]
    assert fmt_lines[0].startswith("format kohya, family sd15, 12 LoRA modules, 36 tensors")
    assert fmt_lines[1].startswith("format peft, family sd15, 11 LoRA modules, 22 tensors")
    assert "base-model family: sd15" in rep["lines"]
    assert f"weights: {len(SHARED_ATTENTION) + 1} covered by both LoRAs, {len(SHARED_ATTENTION)} scheduled" in text

    # gamma, with the trimming
    assert close(rep["gamma"], gamma), (rep["gamma"], gamma)
    assert f"{dropped} ratios >= 3 x that mean dropped" in rep["gamma_line"]
    assert close(float(rep["gamma_line"].split(" = ")[2].split(";")[0]), first_mean)
    assert f"pattern {pattern}" in text and f"{steps} steps" in text

    # per-layer scores and choices, in model order
    assert list(rep["table"]) == list(refs)
    for key, (k, t_s, t_t) in rows.items():
        r_s, r_t, got_k, got_ts, got_tt, got_ratio, marks = rep["table"][key]
        assert (r_s, r_t, got_k) == (R_S, R_T, k), key
        assert close(got_ts, t_s) and close(got_tt, t_t), (key, got_ts, t_s, got_tt, t_t)
        assert close(got_ratio, t_s / (gamma * t_t), 1e-4)
        assert marks == choices[key], key
    assert rep["table"][canon(SHARED_ATTENTION[-1][0])][2] == 16  # capped at the weight's 4 x 4 entries
    n = len(choices)
    first_s = sum(m[0] == "S" for m in choices.values())
    last_s = sum(m[-1] == "S" for m in choices.values())
    assert f"first step (i=0): {first_s} subject, {n - first_s} style" in text
    assert f"last step (i={steps - 1}): {last_s} subject, {n - last_s} style" in text

    # keys only one LoRA covers (whatever the scope), and shared keys outside the scope
    assert rep["only_subject"] == [canon(name) for name, *_ in SUBJECT_ONLY]
    assert rep["only_style"] == [canon(name) for name, *_ in STYLE_ONLY]
    assert rep["outside"] == [canon(name) for name, *_ in SHARED_OTHER]

    # the map as PNG, cell by cell
    check_png(out, choices, steps)
    assert f"wrote {out}" in text

    # the JSON report says the same
    data = json.loads(js.read_text())
    assert data["subject"]["format"] == "kohya" and data["style"]["format"] == "peft"
    assert data["family"] == "sd15" and data["ratios_dropped"] == dropped
    assert close(data["gamma"], gamma)
    assert [w["key"] for w in data["weights"]] == list(refs)
    for w in data["weights"]:
        k, t_s, t_t = rows[w["key"]]
        assert w["k"] == k and close(w["t_s"], t_s) and close(w["t_t"], t_t) and w["steps"] == choices[w["key"]]
    assert data["only_subject"] == rep["only_subject"] and data["only_style"] == rep["only_style"]


def main_out(capsys, *args):
    """Run the CLI in this process (faster than a subprocess); returns (status, stdout, stderr)."""
    from klora_core.cli import main as cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_scope_all_and_strength(tmp_path, pair, capsys):
    """--scope all schedules the shared MLP weight too; strength scales T but never changes a choice."""
    subject, style, refs = pair
    code, out, err = main_out(capsys, "inspect", subject, style, "--scope", "all", "--steps", 8,
                              "--out", tmp_path / "all.png")
    assert code == 0, err
    rep = parse(out)
    assert rep["outside"] == []
    assert set(rep["table"]) == set(refs) | {canon(name) for name, *_ in SHARED_OTHER}
    tables = []
    for strength in (1.0, 0.25):
        code, out, err = main_out(capsys, "inspect", subject, style, "--steps", 8, "--subject-strength", strength,
                                  "--out", tmp_path / "s.png")
        assert code == 0, err
        tables.append(parse(out)["table"])
    rows, *_ = reference(refs, 8, 1.5, 0.5, "s", s_strength=0.25)
    for key in refs:
        assert tables[0][key][6] == tables[1][key][6]
        assert close(tables[1][key][3], rows[key][1])


@pytest.mark.parametrize("family, subject_keys, style_keys", [
    ("sdxl",  # kohya's LDM names + the 2048-wide context, against a diffusers file
     {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (16, 2048),
      "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (16, 16)},
     {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (16, 2048),
      "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (16, 16)}),
    ("flux",  # BFL block names in both files
     {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16), "lora_unet_single_blocks_0_linear1": (40, 16)},
     {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16), "lora_unet_single_blocks_0_linear2": (16, 24)}),
])
def test_format_and_family_detection(tmp_path, capsys, family, subject_keys, style_keys):
    gen = torch.Generator().manual_seed(3)

    def write(path, keys, fmt):
        sd = {}
        for name, (out_f, in_f) in keys.items():
            up, down = torch.randn(out_f, 2, generator=gen), torch.randn(2, in_f, generator=gen)
            if fmt == "kohya":
                sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up, down
                sd[name + ".alpha"] = torch.tensor(2.0)
            else:
                sd[name + ".lora.up.weight"], sd[name + ".lora.down.weight"] = up, down
        save_file(sd, str(path))

    s_fmt, t_fmt = "kohya", ("diffusers" if family == "sdxl" else "kohya")
    write(tmp_path / "s.safetensors", subject_keys, s_fmt)
    write(tmp_path / "t.safetensors", style_keys, t_fmt)
    code, out, err = main_out(capsys, "inspect", tmp_path / "s.safetensors", tmp_path / "t.safetensors",
                              "--steps", 4, "--out", tmp_path / "m.png")
    assert code == 0, err
    fmt_lines = [line.strip() for line in out.splitlines() if line.startswith("  format ")]
    assert fmt_lines[0].startswith(f"format {s_fmt}, family {family},")
    assert fmt_lines[1].startswith(f"format {t_fmt}, family {family},")
    assert f"base-model family: {family}" in out
    rep = parse(out)
    if family == "flux":
        assert rep["only_subject"] == ["single_blocks_0_linear1"] and rep["only_style"] == ["single_blocks_0_linear2"]
        assert list(rep["table"]) == ["double_blocks_0_img_attn_qkv"]
    else:
        assert len(rep["table"]) == 2 and rep["only_subject"] == [] and rep["only_style"] == []


def test_demo_pair_without_files(tmp_path, capsys):
    code, out, err = main_out(capsys, "inspect", "--steps", 6, "--out", tmp_path / "selection_map.png")
    assert code == 0, err
    assert (tmp_path / "selection_map.png").is_file() and (tmp_path / "demo_subject.safetensors").is_file()
    assert len(parse(out)["table"]) == 24


# --- help and errors --------------------------------------------------------------------

def test_help_documents_everything(capsys):
    code, out, _ = main_out(capsys, "inspect", "--help")
    assert code == 0
    for word in ("SUBJECT", "STYLE", "--steps", "--pattern", "--alpha", "--beta", "--subject-strength",
                 "--style-strength", "--scope", "--out", "--json", "--seed", "--title", "-v",
                 "format", "kohya", "diffusers", "peft", "family", "sd15", "sdxl", "flux", "gamma", "T_S", "T_T",
                 "K = r_S * r_T", "only the subject", "PNG", "Exit status"):
        assert word in out, word
    code, out, _ = main_out(capsys, "--help")
    assert code == 0
    commands = ["map", "inspect", "run"]
    for command in commands:
        assert f"    {command} " in out, command


def _one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("klora: error: ")
    return lines[0]


def test_errors_are_one_line(tmp_path, pair, capsys):
    subject, style, _ = pair
    missing = run_cli("inspect", tmp_path / "nope.safetensors", style, "--out", tmp_path / "x.png", cwd=tmp_path)
    assert missing.returncode == 1 and "file not found" in _one_line(missing.stderr)
    assert missing.stdout == "" and not (tmp_path / "x.png").exists()

    def fails(*args, status=1):
        code, out, err = main_out(capsys, "inspect", *args)
        assert code == status, (args, out, err)
        return _one_line(err)

    assert "both SUBJECT and STYLE" in fails(subject, status=2)
    assert ".png" in fails(subject, style, "--out", tmp_path / "x.jpg", status=2)
    (tmp_path / "dir.json").mkdir()
    assert "dir.json" in fails(subject, style, "--out", tmp_path / "y.png", "--json", tmp_path / "dir.json")

    # the same layer name, but the 2048-wide SDXL context: different base models
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = {name + ".lora_up.weight": torch.randn(32, 2), name + ".lora_down.weight": torch.randn(2, 2048)}
    save_file(sd, str(tmp_path / "xl.safetensors"))
    assert "same base model" in fails(subject, tmp_path / "xl.safetensors", "--out", tmp_path / "z.png")

    for argv in (["--steps", "0"], ["--pattern", "q"], ["--alpha", "inf"], ["--bogus"]):
        fails(*argv, status=2)
