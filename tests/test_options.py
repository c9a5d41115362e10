"""The node, the preview route and the command line accept exactly the same option values.

Each option is defined once in ``klora_core/options.py``; this test asks each
of the three front doors about the same candidate values (edges, just past
them, NaN, infinities) and compares the answers with the range written out
here, not read from the code under test.
"""
from __future__ import annotations

import math

import pytest

from klora_core.cli import main as cli

#: option -> (lo, hi, default) as documented in the README; written out independently of options.py.
DOCUMENTED = {
    "strength": (-100.0, 100.0, 1.0),
    "alpha": (0.0, 10.0, 1.5),
    "beta": (-1.0, 10.0, 0.5),  # 0.1.0: default -1 (= the pattern's value; still accepted, same meaning)
    "steps": (1, 150, 20),
}


def _candidates(lo, hi):
    span = hi - lo
    return [lo, hi, lo - 0.5, hi + 0.5, lo + span / 3, float("nan"), float("inf"), float("-inf")]


def _documented_ok(option, value) -> bool:
    lo, hi, _ = DOCUMENTED[option]
    if not math.isfinite(value):
        return False
    if option == "steps" and not float(value).is_integer():
        return False
    return lo <= value <= hi


def _cli_accepts(flag: str, value) -> bool:
    text = str(int(value)) if isinstance(value, float) and value.is_integer() and flag == "--steps" else repr(value)
    try:
        cli.build_parser().parse_args(["map", f"{flag}={text}"])
    except SystemExit as exc:
        assert exc.code == 2
        return False
    return True


def _route_accepts(param: str, value) -> bool:
    from klora_pack.nodes.preview_params import PreviewRequestError, parse_params

    raw = {"subject": "a.safetensors", "style": "b.safetensors", param: value}
    try:
        parse_params(raw, from_query=False, names=["a.safetensors", "b.safetensors"])
    except PreviewRequestError:
        return False
    return True


def _node_accepts(node_spec: dict, value, runtime_check) -> bool:
    """ComfyUI's own min/max validation (execution.validate_inputs compares with < and >) AND the node's check."""
    if value < node_spec["min"] or value > node_spec["max"]:  # what ComfyUI does; NaN slips through
        return False
    try:
        runtime_check(value)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("option,flag,param,node_input", [
    ("strength", "--subject-strength", "subject_strength", ("loader", "strength")),
    ("strength", "--style-strength", "style_strength", ("loader", "strength")),
    ("alpha", "--alpha", "alpha", ("fuse", "alpha")),
    ("beta", "--beta", "beta", ("fuse", "beta")),
    ("steps", "--steps", "map_steps", ("fuse", "map_steps")),
])
def test_same_values_everywhere(klora_pack, option, flag, param, node_input):
    from klora_pack.klora_core import options
    from klora_pack.nodes.fuse_node import KLoRAFuse
    from klora_pack.nodes.lora_loaders import KLoRASubjectLoader

    node_cls = KLoRAFuse if node_input[0] == "fuse" else KLoRASubjectLoader
    spec = node_cls.INPUT_TYPES()
    spec = {**spec["required"], **spec.get("optional", {})}[node_input[1]][1]
    lo, hi, default = DOCUMENTED[option]
    assert (spec["min"], spec["max"], spec["default"]) == (lo, hi, default)
    runtime = {"strength": options.STRENGTH, "alpha": options.ALPHA, "beta": options.BETA,
               "steps": options.STEPS}[option]
    for value in _candidates(lo, hi):
        expected = _documented_ok(option, value)
        answers = {
            "node": _node_accepts(spec, value, lambda v: runtime.check(node_input[1], v)),
            "route": _route_accepts(param, value),
            "cli": _cli_accepts(flag, value),
        }
        assert answers == {k: expected for k in answers}, (option, value)


def test_cli_map_refuses_what_the_node_refuses():
    """Before options.py, ``map --alpha -1`` and ``--beta -2`` were accepted although the node refuses them."""
    for argv in (["map", "--alpha=-1"], ["map", "--beta=-2"], ["inspect", "--steps=151"]):
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args(argv)
        assert info.value.code == 2


def test_nan_strength_is_refused_by_the_loader_naming_the_input(klora_pack, tmp_path):
    """A workflow JSON can carry NaN: ComfyUI's min/max check lets it through, the loader must not."""
    from klora_pack.klora_core.errors import KLoRAError
    from klora_pack.nodes.lora_loaders import KLoRASubjectLoader

    with pytest.raises(KLoRAError, match="strength must be a finite number"):
        KLoRASubjectLoader.execute("missing.safetensors", float("nan"))
