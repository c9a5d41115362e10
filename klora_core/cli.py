"""Command line: ``python -m klora_core map [SUBJECT STYLE] [options]``.

Reads two LoRA ``.safetensors`` files (or generates the seeded demo pair),
scores them once with :func:`klora_core.build_plan` and shows which delta
K-LoRA applies to each attention weight at each sampling step: a PNG map
(:func:`klora_core.render.render_selection_map`) and, with ``--table``, a
text table on stdout.  No ComfyUI is needed.

Exit status: 0 on success, 1 when an input cannot be used (one line on
stderr, ``klora: error: ...``), 2 for invalid command-line usage.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import KLoRAError

log = logging.getLogger(__name__)

PROG = "python -m klora_core"
MAX_STEPS = 10000

_DESCRIPTION = """\
K-LoRA fuses a subject LoRA and a style LoRA by choosing, for every attention
weight and every sampling step, exactly ONE of the two deltas: the subject's
when T_S / gamma > T_T * scale(p), else the style's.  T_S and T_T are the sums
of the K = rank_S * rank_T largest |delta| entries of that weight, gamma
balances the two LoRAs (trimmed mean of their per-weight L1 ratios) and
scale(p) grows with the sampling progress p = i / steps (pattern s:
alpha*p + beta; pattern s*: (alpha*p + beta) mod alpha)."""

_MAP_EPILOG = """\
examples:
  %(prog)s                                  # demo LoRAs, writes selection_map.png
  %(prog)s dog.safetensors watercolor.safetensors --steps 30 --table
  %(prog)s dog.safetensors ink.safetensors --pattern 's*' --out ink_map.png

Without SUBJECT and STYLE the seeded demo pair (demo_subject.safetensors,
demo_style.safetensors; small SD1.5-like attention layout) is written next to
--out and used.  Only .safetensors files are read (kohya, diffusers and PEFT
key names; the same layer named by different conventions is paired).
Pickle-based .pt/.ckpt/.bin files are refused: convert them first.
Exit status: 0 ok, 1 unusable input (one line on stderr), 2 bad usage."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"klora: error: {message} (see {self.prog} --help)\n")


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be an integer, got {text!r}") from None
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"--steps must be between 1 and {MAX_STEPS}, got {value}")
    return value


def _number(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"klora_core {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    m = sub.add_parser(
        "map", aliases=["inspect"], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show which LoRA delta each weight uses at each step (PNG map, optional table)",
        description="Score a subject/style LoRA pair and draw the K-LoRA selection map.", epilog=_MAP_EPILOG,
    )
    m.add_argument("subject", nargs="?", metavar="SUBJECT", help="subject LoRA (.safetensors); omit both files for the demo pair")
    m.add_argument("style", nargs="?", metavar="STYLE", help="style LoRA (.safetensors)")
    m.add_argument("--steps", type=_steps, default=20, help="sampling steps (columns), 1-%d; step i has progress i/steps (default 20)" % MAX_STEPS)
    m.add_argument("--pattern", choices=["s", "s*"], default="s",
                   help="style-factor schedule: s = alpha*p + beta (paper's main results), "
                        "s* = (alpha*p + beta) mod alpha (supplement; suits FLUX) (default s)")
    m.add_argument("--alpha", type=_number, default=None, help="schedule slope (default 1.5)")
    m.add_argument("--beta", type=_number, default=None, help="schedule offset (default 0.5 for s, 1.275 for s*)")
    m.add_argument("--subject-strength", type=_number, default=1.0, metavar="X",
                   help="subject LoRA strength (scales its delta; the choice itself is invariant to it) (default 1)")
    m.add_argument("--style-strength", type=_number, default=1.0, metavar="X", help="style LoRA strength (default 1)")
    m.add_argument("--scope", choices=["attention", "all"], default="attention",
                   help="weights to schedule: attention projections q/k/v/out of the diffusion model "
                        "(the paper's choice) or every weight both LoRAs cover (default attention)")
    m.add_argument("--out", default="selection_map.png", metavar="PNG", help="where to write the map (default selection_map.png)")
    m.add_argument("--table", action="store_true", help="print the per-weight table (scores and S/T per step) to stdout")
    m.add_argument("--title", default=None, help="first title line of the map")
    m.add_argument("--seed", type=int, default=None, help="seed of the generated demo pair (default 2025; demo only)")
    m.add_argument("-v", "--verbose", action="store_true", help="log what is read and paired to stderr")
    m.set_defaults(func=run_map)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _load_pair(args):
    from .lora_file import detect_family, is_attention_module, load_lora_file

    if (args.subject is None) != (args.style is None):
        raise KLoRAError("give both SUBJECT and STYLE LoRA files, or neither for the demo pair")
    if args.subject is None:
        from .demo import DEFAULT_SEED, save_demo_pair

        folder = os.path.dirname(os.path.abspath(args.out))
        seed = DEFAULT_SEED if args.seed is None else args.seed
        try:
            subject_path, style_path = save_demo_pair(folder, seed)
        except OSError as exc:
            raise KLoRAError(f"{folder}: cannot write the demo LoRAs ({exc.strerror or exc})") from None
        print(f"demo LoRAs (seed {seed}): {subject_path} {style_path}")
    else:
        subject_path, style_path = args.subject, args.style
    subject = load_lora_file(subject_path, args.subject_strength)
    style = load_lora_file(style_path, args.style_strength)
    fam_s, fam_t = detect_family(subject), detect_family(style)
    if "unknown" not in (fam_s, fam_t) and fam_s != fam_t:
        raise KLoRAError(f"the subject LoRA looks like {fam_s} but the style LoRA like {fam_t}; both must fit the same base model")
    shared = [k for k in subject if k in style]
    log.info("paired %d modules; %d only in subject, %d only in style",
             len(shared), len(subject) - len(shared), len(style) - len(shared))
    if args.scope == "attention":
        kept_s = {k: v for k, v in subject.items() if is_attention_module(k)}
        kept_t = {k: v for k, v in style.items() if is_attention_module(k)}
        if shared and not any(k in kept_t for k in kept_s):
            raise KLoRAError(
                f"the LoRAs share {len(shared)} weights but no attention projection (q/k/v/out); use --scope all"
            )
        subject, style = kept_s, kept_t
    if not shared:
        raise KLoRAError(
            f"{subject_path} and {style_path} have no layer in common (different base models, "
            "or naming conventions that cannot be paired)"
        )
    return subject, style


def run_map(args) -> int:
    from .plan import build_plan
    from .render import render_selection_map, selection_table

    if not args.out.lower().endswith(".png"):
        raise KLoRAError(f"{args.out}: the selection map is written as PNG; use a .png file name")
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise KLoRAError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    subject, style = _load_pair(args)
    plan = build_plan(subject, style, args.alpha, args.beta, args.pattern)
    render_selection_map(plan, args.steps, path=args.out, title=args.title)
    if args.table:
        sys.stdout.write(selection_table(plan, args.steps))
    else:
        selection = plan.selection(args.steps)
        first = sum(v[0] for v in selection.values())
        last = sum(v[-1] for v in selection.values())
        n = len(selection)
        print(f"gamma={plan.gamma:.6g} alpha={plan.alpha:g} beta={plan.beta:g} pattern={plan.pattern} "
              f"steps={args.steps} weights={n}")
        print(f"first step: {first} subject, {n - first} style; last step: {last} subject, {n - last} style")
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="klora: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KLoRAError as exc:
        sys.stderr.write(f"klora: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("klora: interrupted\n")
        return 130
