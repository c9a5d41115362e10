"""Command line: ``python -m klora_core map|inspect [SUBJECT STYLE] [options]`` (and ``run``).

Reads two LoRA files (or generates the seeded demo pair) with the project's
one reader (:func:`klora_core.safe_load.load_tensors`, as the nodes do),
scores them once with :func:`klora_core.build_plan` and shows which delta
K-LoRA applies to each attention weight at each sampling step: a PNG map
(:func:`klora_core.render.render_selection_map`) and, with ``--table``, a
text table on stdout.  ``inspect`` takes the same options and reports
everything the scoring computed: each file's LoRA format and base-model
family, gamma and its trimming, per-weight ``T_S``, ``T_T``, ranks and ``K``,
the per-step table, the map, and the keys only one LoRA covers (optionally
as JSON).  No ComfyUI is needed.

Exit status: 0 on success, 1 when an input cannot be used (one line on
stderr, ``klora: error: ...``), 2 for invalid command-line usage (argparse's
own errors, a mistyped option with a suggestion, and :class:`UsageError`).
A missing package (torch, numpy, safetensors, Pillow) is one line too, the
same for every subcommand (:mod:`klora_core.cli.packages`).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import sys

from .. import options
from ..errors import KLoRAError
from ..options import CLI_SCOPES, STEPS, STRENGTH
from .arg_types import UsageError, add_schedule_arguments, option_value
from .packages import missing_message, missing_packages, package_of

log = logging.getLogger(__name__)

PROG = "python -m klora_core"

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
demo_style.safetensors: the 24 attention projections of the demo SD1.5-shaped
UNet, the pair `bash scripts/demo.sh` renders with) is written next to --out
and used.  Files are read as the ComfyUI nodes read them: .safetensors, or
.pt/.pth/.ckpt/.bin/.pkl with torch's weights-only loader (which refuses
embedded code); kohya, diffusers and PEFT key names (the same layer named by
different conventions is paired).
Exit status: 0 ok, 1 unusable input (one line on stderr), 2 bad usage."""

_INSPECT_EPILOG = """\
examples:
  %(prog)s dog.safetensors watercolor.safetensors
  %(prog)s dog.safetensors ink.safetensors --pattern 's*' --steps 30 --out ink.png --json ink.json
  %(prog)s                                  # the seeded demo pair

stdout, in this order:
  subject/style LoRA     path, LoRA format (kohya, diffusers, peft or unknown),
                         base-model family (sd15, sdxl, flux or unknown; from key
                         names and, where present, the cross-attention context
                         width), number of LoRA modules
  base-model family      the family both files agree on
  weights                how many both LoRAs cover; how many of those --scope keeps
  gamma                  the balance factor: mean of the ratios sum|dS| / sum|dT|
                         of the scheduled weights, then the mean again without ratios
                         >= 3 x the first mean (both means and the count dropped
                         are printed)
  schedule               pattern, scale(p), alpha, beta, steps (p = i / steps)
  per-weight table       one row per scheduled weight, in model order: r_S, r_T
                         (ranks), K = r_S * r_T capped at the weight's size, T_S
                         and T_T (sums of the K largest |delta| entries, after
                         alpha/rank and strength), T_S/(g*T_T) (the weight takes
                         the subject while scale(p) is below this) and the choice
                         per step (S = subject, T = style)
  first/last step        subject/style counts
  only in one LoRA       every key only the subject (or only the style) LoRA
                         covers: applied as a plain LoRA, never switched
  outside the scope      keys both cover that --scope does not schedule
  wrote                  the PNG map (--out) and the JSON report (--json)
Key names are the normalised module names shared by kohya, diffusers and PEFT
files (see `map --help`).
Exit status: 0 ok, 1 unusable input (one line on stderr), 2 bad usage."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message, no prefix matching (``--step`` is not ``--steps``: a typo
    must be an error) and a suggestion for a mistyped option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"klora: error: {message}{self._suggestion(message)} (see {self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        """``"; did you mean --steps?"`` for the first unrecognized ``--option`` close to a known one."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"klora_core {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    m = sub.add_parser(
        "map", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show which LoRA delta each weight uses at each step (PNG map, optional table)",
        description="Score a subject/style LoRA pair and draw the K-LoRA selection map.", epilog=_MAP_EPILOG,
    )
    _add_pair_arguments(m)
    m.set_defaults(func=run_map, check=check_pair_usage)
    i = sub.add_parser(
        "inspect", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="report everything K-LoRA computes for a LoRA pair: formats, family, gamma, per-weight "
             "T_S/T_T/K, the selection table and map, keys only one LoRA covers",
        description="Score a subject/style LoRA pair, print the full K-LoRA report (the per-weight table is\n"
                    "always printed; --table is accepted for symmetry with map), write the selection map\n"
                    "(--out) and, with --json, the same report as JSON.", epilog=_INSPECT_EPILOG,
    )
    _add_pair_arguments(i)
    i.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON to FILE")
    i.set_defaults(func=run_inspect, check=check_pair_usage)
    from .run_command import add_run_parser  # `run`: render through a real ComfyUI server

    add_run_parser(sub)
    return parser


def _add_pair_arguments(m: argparse.ArgumentParser) -> None:
    """The options ``map`` and ``inspect`` share."""
    m.add_argument("subject", nargs="?", metavar="SUBJECT",
                   help="subject LoRA (.safetensors; .pt/.ckpt read weights-only); omit both files for the demo pair")
    m.add_argument("style", nargs="?", metavar="STYLE", help="style LoRA (.safetensors; .pt/.ckpt read weights-only)")
    m.add_argument("--steps", type=option_value(STEPS, "--steps"), default=STEPS.default,
                   help=f"sampling steps (columns), {STEPS.lo}-{STEPS.hi}; step i has progress i/steps "
                        f"(default {STEPS.default})")
    add_schedule_arguments(m)
    m.add_argument("--subject-strength", type=option_value(STRENGTH, "--subject-strength"),
                   default=STRENGTH.default, metavar="X",
                   help="subject LoRA strength (scales its delta; the choice itself is invariant to it) (default 1)")
    m.add_argument("--style-strength", type=option_value(STRENGTH, "--style-strength"),
                   default=STRENGTH.default, metavar="X",
                   help="style LoRA strength (default 1)")
    m.add_argument("--scope", choices=list(CLI_SCOPES), default="attention",
                   help="weights to schedule: attention projections q/k/v/out of the diffusion model "
                        "(the paper's choice) or every weight both LoRAs cover (default attention)")
    m.add_argument("--out", default="selection_map.png", metavar="PNG", help="where to write the map (default selection_map.png)")
    m.add_argument("--table", action="store_true", help="print the per-weight table (scores and S/T per step) to stdout")
    m.add_argument("--title", default=None, help="first title line of the map")
    m.add_argument("--seed", type=int, default=None,
                   help="seed of the generated demo pair (default 2025, as scripts/demo.sh; demo only)")
    m.add_argument("-v", "--verbose", action="store_true", help="log what is read and paired to stderr")


def _version() -> str:
    from .. import __version__

    return __version__


def _read_lora(path, role: str, strength: float):
    """``({canonical module: (up, down)}, facts)`` of one LoRA file; facts: its format, base-model family
    (from names and shapes) and tensor count."""
    from ..lora_file import detect_family, detect_format, lora_modules
    from ..safe_load import load_tensors

    state_dict = load_tensors(path, f"{role} LoRA")
    modules = lora_modules(state_dict, strength, source=os.fspath(path))
    facts = {"format": detect_format(state_dict), "family": detect_family(state_dict), "tensors": len(state_dict)}
    log.info("%s: %d LoRA modules, format %s, family %s", os.fspath(path), len(modules), facts["format"],
             facts["family"])
    return modules, facts


def _load_pair(args, info=None):
    """``(subject, style)`` module dicts, kept to ``--scope``; ``info`` (a dict) also gets the paths,
    the name-based families, each file's facts and every module name of both files, before the scope filter."""
    from ..lora_file import detect_family
    from ..weight_keys import is_attention_name

    if args.subject is None:
        from .demo_pair import DEFAULT_SEED, save_demo_pair

        folder = os.path.dirname(os.path.abspath(args.out))
        seed = DEFAULT_SEED if args.seed is None else args.seed
        try:
            subject_path, style_path = save_demo_pair(folder, seed)
        except OSError as exc:
            raise KLoRAError(f"{folder}: cannot write the demo LoRAs ({exc.strerror or exc})") from None
        print(f"demo LoRAs (seed {seed}): {subject_path} {style_path}")
    else:
        subject_path, style_path = args.subject, args.style
    subject, subject_facts = _read_lora(subject_path, "subject", args.subject_strength)
    style, style_facts = _read_lora(style_path, "style", args.style_strength)
    fam_s, fam_t = detect_family(subject), detect_family(style)
    if "unknown" not in (fam_s, fam_t) and fam_s != fam_t:
        raise KLoRAError(f"the subject LoRA looks like {fam_s} but the style LoRA like {fam_t}; both must fit the same base model")
    shared = [k for k in subject if k in style]
    if info is not None:
        info.update(paths=(subject_path, style_path), families=(fam_s, fam_t),
                    facts=(subject_facts, style_facts),
                    subject_keys=tuple(subject), style_keys=tuple(style))
    log.info("paired %d modules; %d only in subject, %d only in style",
             len(shared), len(subject) - len(shared), len(style) - len(shared))
    if args.scope == "attention":
        kept_s = {k: v for k, v in subject.items() if is_attention_name(k)}
        kept_t = {k: v for k, v in style.items() if is_attention_name(k)}
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


def check_pair_usage(args) -> None:
    """What argparse cannot check for ``map``/``inspect``: both files or neither, a PNG ``--out``."""
    if (args.subject is None) != (args.style is None):
        raise UsageError("give both SUBJECT and STYLE LoRA files, or neither for the demo pair")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: the selection map is written as PNG; use a .png file name")


def run_map(args) -> int:
    from ..plan import build_plan
    from ..render import render_selection_map, selection_table

    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise KLoRAError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    subject, style = _load_pair(args)
    plan = build_plan(subject, style, args.alpha, options.resolve_beta(args.beta, args.pattern), args.pattern)
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


def _fmt_keys(keys) -> list:
    return [f"  {k}" for k in keys] or ["  (none)"]


def run_inspect(args) -> int:
    """``inspect``: everything :func:`run_map` shows, plus formats, family, gamma details, K and key lists."""
    import json

    from ..gamma import OUTLIER_FACTOR, trimming
    from ..plan import build_plan
    from ..render import _schedule_text, render_selection_map

    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: the selection map is written as PNG; use a .png file name")
    for target in (args.out, args.json):
        if target is None:
            continue
        folder = os.path.dirname(os.path.abspath(target))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise KLoRAError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    info = {}
    subject, style = _load_pair(args, info)
    facts = info["facts"]
    families = {f["family"] for f in facts} - {"unknown"}
    if len(families) > 1:
        raise KLoRAError(f"the subject LoRA looks like {facts[0]['family']} but the style LoRA like "
                         f"{facts[1]['family']}; both must fit the same base model")
    family = families.pop() if families else "unknown"
    plan = build_plan(subject, style, args.alpha, options.resolve_beta(args.beta, args.pattern), args.pattern)
    steps = args.steps
    selection = plan.selection(steps)
    render_selection_map(plan, steps, path=args.out, title=args.title)

    s_keys, t_keys = info["subject_keys"], info["style_keys"]
    t_set, s_set = set(t_keys), set(s_keys)
    only_subject = [k for k in s_keys if k not in t_set]
    only_style = [k for k in t_keys if k not in s_set]
    shared = [k for k in s_keys if k in t_set]
    outside = [k for k in shared if k not in plan.details]
    ratios = list(plan.ratios.values())
    first_mean, dropped = trimming(ratios)

    out = []
    for role, path, fact, keys in (("subject", info["paths"][0], facts[0], s_keys),
                                   ("style", info["paths"][1], facts[1], t_keys)):
        out.append(f"{role} LoRA: {path}")
        out.append(f"  format {fact['format']}, family {fact['family']}, {len(keys)} LoRA modules, "
                   f"{fact['tensors']} tensors")
    out.append(f"base-model family: {family}")
    out.append(f"weights: {len(shared)} covered by both LoRAs, {len(plan.details)} scheduled (--scope {args.scope})")
    out.append(f"gamma = {plan.gamma:.10g} (mean of {len(ratios)} ratios sum|dS|/sum|dT| = {first_mean:.10g}; "
               f"{dropped} ratios >= {OUTLIER_FACTOR:g} x that mean dropped; mean of the other {len(ratios) - dropped})")
    out.append(f"schedule: pattern {plan.pattern}, {_schedule_text(plan)}, alpha = {plan.alpha:g}, "
               f"beta = {plan.beta:g}, {steps} steps, p = i/{steps}")
    out.append("rule: subject delta at step i iff T_S / gamma > T_T * scale(p)")
    width = max([len("weight")] + [len(k) for k in plan.details])
    out.append(f"{'weight':<{width}}  {'r_S':>4}  {'r_T':>4}  {'K':>7}  {'T_S':>15}  {'T_T':>15}  "
               f"{'T_S/(g*T_T)':>15}  steps (S=subject, T=style)")
    rows = []
    for key, d in plan.details.items():
        ratio = d.subject_topk / (plan.gamma * d.style_topk) if d.style_topk > 0 else float("inf")
        marks = "".join("S" if c else "T" for c in selection[key])
        out.append(f"{key:<{width}}  {d.subject_rank:>4}  {d.style_rank:>4}  {d.k:>7}  {d.subject_topk:>15.9g}  "
                   f"{d.style_topk:>15.9g}  {ratio:>15.9g}  {marks}")
        rows.append({"key": key, "subject_rank": d.subject_rank, "style_rank": d.style_rank, "k": d.k,
                     "t_s": d.subject_topk, "t_t": d.style_topk, "subject_l1": d.subject_l1,
                     "style_l1": d.style_l1, "ratio": ratio if math.isfinite(ratio) else None, "steps": marks})
    counts = []
    for label, step in (("first", 0), ("last", steps - 1)):
        n_s = sum(1 for v in selection.values() if v[step])
        counts.append((n_s, len(selection) - n_s))
        out.append(f"{label} step (i={step}): {n_s} subject, {len(selection) - n_s} style")
    out.append(f"only in the subject LoRA ({len(only_subject)}; applied as a plain LoRA, never switched):")
    out += _fmt_keys(only_subject)
    out.append(f"only in the style LoRA ({len(only_style)}; applied as a plain LoRA, never switched):")
    out += _fmt_keys(only_style)
    out.append(f"in both LoRAs but outside --scope {args.scope} ({len(outside)}; not scheduled here):")
    out += _fmt_keys(outside)
    out.append(f"wrote {args.out}")
    if args.json is not None:
        report = {
            "subject": {"path": os.fspath(info["paths"][0]), **facts[0], "modules": len(s_keys)},
            "style": {"path": os.fspath(info["paths"][1]), **facts[1], "modules": len(t_keys)},
            "family": family, "scope": args.scope, "gamma": plan.gamma, "ratio_mean": first_mean,
            "ratios_dropped": dropped, "pattern": plan.pattern, "alpha": plan.alpha, "beta": plan.beta,
            "steps": steps, "weights": rows, "first_step": dict(zip(("subject", "style"), counts[0])),
            "last_step": dict(zip(("subject", "style"), counts[1])), "only_subject": only_subject,
            "only_style": only_style, "outside_scope": outside, "map": os.fspath(args.out),
        }
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        except OSError as exc:
            raise KLoRAError(f"{args.json}: cannot write the JSON report ({exc.strerror or exc})") from None
        out.append(f"wrote {args.json}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def parse_arguments(parser: argparse.ArgumentParser, argv=None):
    """``parser.parse_args(argv)``, but an unknown option is reported by its subcommand's parser: the
    message then says ``see python -m klora_core run --help`` and suggests that command's own options."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="klora: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        args.check(args)  # usage first: exit 2 whatever is installed
        missing = missing_packages()
        if missing:
            raise KLoRAError(missing_message(args.command, missing))
        return args.func(args)
    except UsageError as exc:
        sys.stderr.write(f"klora: error: {exc} (see {PROG} {args.command} --help)\n")
        return 2
    except KLoRAError as exc:
        sys.stderr.write(f"klora: error: {exc}\n")
        return 1
    except ImportError as exc:  # a package that imported above but fails deeper down (a broken install)
        if package_of(exc) is None or getattr(args, "verbose", False):
            return _unexpected(exc, args)
        sys.stderr.write(f"klora: error: {missing_message(args.command, [package_of(exc)])} ({exc})\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("klora: interrupted\n")
        return 130
    except Exception as exc:  # anything unforeseen: still one line and a non-zero status
        return _unexpected(exc, args)


def _unexpected(exc: Exception, args) -> int:
    """One line for an error nobody foresaw (the traceback with -v); status 1."""
    if getattr(args, "verbose", False):
        raise exc
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    sys.stderr.write(f"klora: error: unexpected {type(exc).__name__}{': ' + detail if detail else ''} "
                     "(run again with -v for the traceback)\n")
    return 1
