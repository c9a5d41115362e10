# SPDX-License-Identifier: GPL-3.0-or-later
"""The options of ``python -m klora_core run``: its argparse parser, help text and checks.

The command itself is :mod:`klora_core.cli.run_command`.
"""
from __future__ import annotations

import argparse

from .. import options
from ..errors import KLoRAError
from ..options import ALPHA, BETA, CLI_MEASURES, CLI_SCOPES, OUTSIDE_CHOICES, STEPS, STRENGTH
from .arg_types import UsageError, add_schedule_arguments, finite_number, float_list, int_in_range, option_value
from .comfy.client import DEFAULT_PROMPT_TIMEOUT

RUN_EPILOG = """\
examples:
  %(prog)s                                   # demo models (generated, cached), 1 image
  %(prog)s --steps 4 --out /tmp/klora        # quicker
  %(prog)s --grid 1.0,1.5,2.0 0.3,0.5,0.7    # contact sheet over alpha x beta
  %(prog)s --comfyui ~/ComfyUI --checkpoint v1-5-pruned-emaonly.safetensors \\
      --subject my_dog.safetensors --style watercolor.safetensors \\
      --prompt "a photo of sks dog, watercolor painting" --seed 1 --seed 2 --steps 30

Without --checkpoint, a seeded demo UNet (SD1.5-detectable), CLIP-L text
encoder, TAESD-layout VAE and subject/style LoRA pair are generated into
$KLORA_DEMO_MODELS (default ~/.cache/klora-comfyui/demo-models) once and
reused; their weights are random, so the image is textured noise: the run
shows the whole pipeline working, not a picture.  With --checkpoint you must
give --subject and --style as well.

A file argument that exists on disk is linked into a temporary model folder;
any other value is a name from that ComfyUI's own models folders.

The run starts ComfyUI (python main.py from --comfyui) on a free 127.0.0.1
port with this pack installed as custom node 'klora-fusion', posts the
workflow to its HTTP API and stops it afterwards.  Outputs in --out:
klora_seed<SEED>.png, selection_map.png, report.txt (K-LoRA's report: gamma,
which LoRA each weight takes at the first and last step), workflow_api.json
(load it in ComfyUI) and comfyui.log; with --grid also
grid_seed<SEED>.png and grid/<cell>.png.
Exit status: 0 ok, 1 failure (one line on stderr), 2 bad usage."""


def build_run_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand and its options to ``subparsers``; the caller sets its ``func``."""
    r = subparsers.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="render with K-LoRA through a real ComfyUI server (demo models, or your own)",
        description="Start ComfyUI with this pack, run loaders -> Load Subject/Style LoRA -> K-LoRA Fuse -> "
                    "KSampler -> VAE decode -> save, and copy the image, the selection map and the report.",
        epilog=RUN_EPILOG)
    where = r.add_argument_group("ComfyUI")
    where.add_argument("--comfyui", metavar="PATH", default=None,
                       help="ComfyUI folder to run (default: $COMFYUI_PATH, else the cached ComfyUI of "
                            "scripts/setup_comfyui_env.sh, the version $KLORA_COMFYUI_VERSION names)")
    where.add_argument("--python", metavar="EXE", default=None,
                       help="python that runs ComfyUI (default: this python)")
    where.add_argument("--cpu", action="store_true",
                       help="force ComfyUI onto the CPU (default: CPU only when torch sees no GPU)")
    where.add_argument("--port", type=int_in_range(1, 65535, "--port"), default=None,
                       help="port on 127.0.0.1 (default: a free one)")
    where.add_argument("--threads", type=int_in_range(1, 1024, "--threads"), default=None, metavar="N",
                       help="CPU threads for ComfyUI's torch (sets OMP_NUM_THREADS; default: torch's choice). On the "
                            "CPU the server also gets OMP_WAIT_POLICY=PASSIVE unless it is set")
    where.add_argument("--timeout", type=finite_number, default=DEFAULT_PROMPT_TIMEOUT, metavar="S",
                       help="give up on one image after S seconds (default %(default)g)")
    models = r.add_argument_group("models")
    models.add_argument("--checkpoint", metavar="NAME_OR_PATH", default=None,
                        help="checkpoint for CheckpointLoaderSimple (default: the generated demo UNet, CLIP-L "
                             "and VAE through UNETLoader, CLIPLoader and VAELoader)")
    models.add_argument("--subject", metavar="NAME_OR_PATH", default=None,
                        help="subject LoRA (default: the generated demo subject LoRA)")
    models.add_argument("--style", metavar="NAME_OR_PATH", default=None,
                        help="style LoRA (default: the generated demo style LoRA)")
    models.add_argument("--subject-strength", type=option_value(STRENGTH, "--subject-strength"),
                        default=STRENGTH.default, metavar="X",
                        help="strength of the subject delta whenever it is chosen (default 1)")
    models.add_argument("--style-strength", type=option_value(STRENGTH, "--style-strength"),
                        default=STRENGTH.default, metavar="X",
                        help="strength of the style delta whenever it is chosen (default 1)")
    models.add_argument("--demo-seed", type=int, default=None, metavar="N",
                        help="seed of the generated demo models (default 2025)")
    sampling = r.add_argument_group("sampling")
    sampling.add_argument("--prompt", default="a photo of sks dog, watercolor painting",
                          help="positive prompt (default: %(default)r)")
    sampling.add_argument("--negative", default="blurry, low quality", help="negative prompt (default: %(default)r)")
    sampling.add_argument("--seed", type=int, action="append", default=None, metavar="N",
                          help="noise seed; repeat for several images (default 0)")
    sampling.add_argument("--steps", type=option_value(STEPS, "--steps"), default=STEPS.default,
                          help=f"sampling steps, {STEPS.lo}-{STEPS.hi} (default {STEPS.default})")
    sampling.add_argument("--cfg", type=finite_number, default=7.0, help="classifier-free guidance scale (default 7)")
    sampling.add_argument("--sampler", default="euler", help="KSampler sampler_name (default euler)")
    sampling.add_argument("--scheduler", default="normal", help="KSampler scheduler (default normal)")
    sampling.add_argument("--width", type=int_in_range(64, 8192, "--width"), default=None,
                          help="image width, multiple of 8 (default 128 for the demo models, 512 otherwise)")
    sampling.add_argument("--height", type=int_in_range(64, 8192, "--height"), default=None,
                          help="image height, multiple of 8 (same default)")
    klora = r.add_argument_group("K-LoRA")
    add_schedule_arguments(klora)
    klora.add_argument("--scope", choices=sorted(CLI_SCOPES), default="attention",
                       help="weights K-LoRA switches: attention projections (paper) or all shared weights "
                            "(default attention)")
    klora.add_argument("--outside-scope", choices=list(OUTSIDE_CHOICES), default=options.OUTSIDE_BOTH,
                       help="shared weights outside the scope get both LoRAs, one, or none (default both)")
    klora.add_argument("--progress-measure", choices=sorted(CLI_MEASURES), default="noise",
                       help="sampling progress p from the noise level or by counting steps (default noise)")
    klora.add_argument("--grid", nargs=2, type=float_list, metavar=("ALPHAS", "BETAS"), default=None,
                       help="render every alpha x beta combination (comma-separated lists, e.g. "
                            "--grid 1.0,1.5,2.0 0.3,0.5,0.7) and draw one labelled contact sheet per seed: each "
                            "cell shows the image and, beside it, that cell's selection map (which LoRA each "
                            "weight takes at each step), since alpha and beta change the choice of delta, "
                            "which the demo's random-weight images cannot show")
    out = r.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default="demo-output", help="output folder (default demo-output)")
    out.add_argument("--keep-temp", action="store_true",
                     help="keep ComfyUI's temporary folders (models, outputs, log) and print where")
    out.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    return r


def grid_axes(args) -> tuple:
    """``(alphas, betas)`` to render: the two --grid lists, else ``([--alpha], [--beta])``; every beta
    resolved (an omitted or negative beta is the pattern's paper value, so labels and reports show it)."""
    alphas = args.grid[0] if args.grid else [args.alpha]
    betas = args.grid[1] if args.grid else [args.beta]
    return alphas, [options.resolve_beta(b, args.pattern) for b in betas]


def check_run_options(args) -> None:
    """Checks argparse cannot make; fills the defaults that depend on other options.

    Sets ``args.width``/``args.height`` (128 px for the demo models, 512 px with
    --checkpoint) and ``args.seeds`` (the --seed list, default ``[0]``); raises
    UsageError (exit status 2, like argparse's own errors) on a combination that
    cannot run, naming the options with their dashes.
    """
    if (args.subject is None) != (args.style is None):
        raise UsageError("give both --subject and --style, or neither for the demo LoRA pair")
    if args.checkpoint and args.subject is None:
        raise UsageError("with --checkpoint give --subject and --style too: the demo LoRAs only fit the demo UNet")
    args.width = args.width or (512 if args.checkpoint else 128)
    args.height = args.height or (512 if args.checkpoint else 128)
    for name in ("width", "height"):
        if getattr(args, name) % 8:
            raise UsageError(f"--{name} must be a multiple of 8, got {getattr(args, name)}")
    if args.grid:
        for label, values, spec in (("ALPHAS", args.grid[0], ALPHA), ("BETAS", args.grid[1], BETA)):
            for value in values:
                try:
                    spec.check(f"--grid {label} value", value)
                except KLoRAError as exc:
                    raise UsageError(str(exc)) from None
        if len(args.grid[0]) * len(args.grid[1]) > 64:
            raise UsageError(f"--grid asks for {len(args.grid[0]) * len(args.grid[1])} images; at most 64")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
    args.seeds = args.seed or [0]
