# SPDX-License-Identifier: GPL-3.0-or-later
"""``python -m klora_core run``: render with K-LoRA through a real ComfyUI server.

Starts ComfyUI (:class:`klora_core.cli.comfy.server.ComfyUIServer`) with this node
pack installed as a custom node, posts the workflow of
:mod:`klora_core.cli.run_graphs` to its HTTP API (``POST /prompt``), follows the
run (websocket ``/ws`` for step progress, ``GET /history/<id>`` for the
result) and copies what ComfyUI saved (``GET /view``) to an output folder;
with ``--grid`` it also draws a contact sheet (:mod:`klora_core.cli.contact_sheet`).
Sampling, model loading and decoding are ComfyUI's own; nothing is
re-implemented here.

Without model arguments it generates the seeded demo models of
:mod:`klora_core.cli.demo_models` (an SD1.5-detectable UNet, a CLIP-L text
encoder, a TAESD-layout VAE and a subject/style LoRA pair) into a cache
folder and uses the cached ComfyUI 0.3.75 of ``scripts/setup_comfyui_env.sh``
(``KLORA_COMFYUI_VERSION=0.8.0``: its cached 0.8.0).

No ComfyUI import: only the standard library, torch/safetensors (to write the
demo models) and Pillow (loaded lazily to draw the ``--grid`` contact sheet;
it ships with every ComfyUI).  Every network request goes to the loopback
server this command started; proxies from the environment are ignored.
The options and their checks are :mod:`klora_core.cli.run_options`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import urllib.error
from pathlib import Path

from .arg_types import UsageError
from .comfy.sampler_names import unknown_name_message
from .comfy.server import (PACK_DIR_NAME, ComfyUIServer, ServerError, find_comfy_root, link_or_copy,
                           server_uses_cpu)
from .contact_sheet import contact_sheet, short_number
from ..errors import KLoRAError
from .run_graphs import IDS, NODE_LABELS, build_workflow
from .run_options import build_run_parser, check_run_options, grid_axes
from .terminal_progress import Progress


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand on ``subparsers`` (klora_core.cli.main)."""
    parser = build_run_parser(subparsers)
    parser.set_defaults(func=run_command, check=check_run_options)
    return parser


def run_command(args) -> int:
    """Entry point of ``python -m klora_core run`` (see :data:`klora_core.cli.run_options.RUN_EPILOG`).

    Every failure surfaces as a KLoRAError (one line, exit status 1 in klora_core.cli.main).
    """
    try:
        return _run(args)
    except KLoRAError:
        raise
    except urllib.error.URLError as exc:
        raise ServerError(f"lost contact with ComfyUI: {exc.reason}") from None
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        raise KLoRAError(f"{where}{exc.strerror or exc}") from None


def _run(args) -> int:
    t_start = time.monotonic()
    if not hasattr(args, "seeds"):  # called without klora_core.cli.main (which checks usage first)
        check_run_options(args)
    comfy_root = find_comfy_root(args.comfyui)
    for kind in ("sampler", "scheduler"):  # a typo fails here, not after ComfyUI started
        message = unknown_name_message(comfy_root, kind, getattr(args, kind), PACK_DIR_NAME)
        if message:
            raise UsageError(message)
    out_dir = Path(args.out).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KLoRAError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None

    def say(text: str) -> None:
        print(f"klora run: {text}", flush=True)

    cpu = server_uses_cpu(args.cpu, args.python)
    env = dict(os.environ)
    if cpu:
        # OpenMP threads that spin while waiting slow CPU sampling down many times over
        # on a busy machine (bench/README.md); passive waiting avoids it.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    workdir = Path(tempfile.mkdtemp(prefix="klora-run-"))
    server = ComfyUIServer(comfy_root, workdir, python=args.python, port=args.port, cpu=cpu, env=env)
    try:
        server.prepare()
        names = _stage_models(args, server, say)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    failed = True
    try:
        say(f"starting ComfyUI from {comfy_root} ({'CPU' if server.cpu else 'GPU'}) ...")
        t0 = time.monotonic()
        server.start()
        for note in server.notes:
            say(note)
        say(f"ComfyUI ready at {server.url} after {time.monotonic() - t0:.1f} s")
        events = server.open_events()
        try:
            written = _render(args, server, names, out_dir, events, say)
        finally:
            if events is not None:
                events.close()
        failed = False
    finally:
        server.stop()
        try:
            shutil.copyfile(server.log_path, out_dir / "comfyui.log")
        except OSError:
            pass
        if args.keep_temp or (failed and os.environ.get("KLORA_KEEP_FAILED")):
            say(f"kept ComfyUI's folders in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for path in written:
        say(f"wrote {path}")
    say(f"done in {time.monotonic() - t_start:.1f} s; open {out_dir}")
    return 0


def _stage_models(args, server: ComfyUIServer, say) -> dict:
    """Generate/link the demo models or the user's files into the server's model folders; ComfyUI names."""
    names: dict = {}
    taken: set = set()
    if args.checkpoint:
        names["checkpoint"] = _stage_file(args.checkpoint, server.checkpoints_dir, "checkpoint", set())
    else:
        _stage_demo_files(args, (("unet", server.unet_dir), ("clip", server.clip_dir), ("vae", server.vae_dir)),
                          names, say)
    if args.subject is None:
        _stage_demo_files(args, (("subject", server.loras_dir), ("style", server.loras_dir)), names, say)
    else:
        names["subject"] = _stage_file(args.subject, server.loras_dir, "subject", taken)
        names["style"] = _stage_file(args.style, server.loras_dir, "style", taken)
    return names


def _stage_demo_files(args, kinds_and_folders, names: dict, say) -> None:
    """Generate (once; cached) the demo model file of each kind, link it into its folder, record its name.

    ``kinds_and_folders``: ``(kind, folder)`` pairs, kind as in :func:`klora_core.cli.demo_models.ensure_file`
    (``unet``, ``clip``, ``vae``, ``subject``, ``style``); ``names[kind]`` gets the file name.
    """
    from . import demo_models

    seed = demo_models.DEFAULT_SEED if args.demo_seed is None else args.demo_seed
    cache = demo_models.default_cache_dir()
    for kind, folder in kinds_and_folders:
        path = demo_models.ensure_file(kind, cache, seed, notify=say)
        link_or_copy(path, folder / path.name)
        names[kind] = path.name


def _stage_file(value: str, folder: Path, role: str, taken: set) -> str:
    """A file that exists is linked into ``folder``; returns the ComfyUI name to use."""
    path = Path(value).expanduser()
    if not path.is_file():
        if os.sep in value or (os.altsep and os.altsep in value):
            if not path.exists():
                raise KLoRAError(f"{role}: {value}: no such file")
            raise KLoRAError(f"{role}: {value}: not a file")
        return value  # a name from ComfyUI's own model folders
    name = path.name
    if name in taken:
        name = f"{role}/{path.name}"
    taken.add(name)
    link_or_copy(path.resolve(), folder / name)
    return name.replace(os.sep, "/")


def _render(args, server: ComfyUIServer, names: dict, out_dir: Path, events, say) -> list:
    """Queue one workflow per (seed, alpha, beta), wait for each and copy its outputs to ``out_dir``.

    Writes workflow_api.json, the images (``--grid``: grid/<cell>.png and a contact sheet per
    seed), selection_map.png and report.txt; returns the paths written, in that order.
    """
    progress = Progress(NODE_LABELS)
    written = []
    alphas, betas = grid_axes(args)
    jobs = [(seed, a, b) for seed in args.seeds for a in alphas for b in betas]
    graphs = [build_workflow(args, names, seed, a, b, f"klora/seed{seed}_alpha{short_number(a)}_beta{short_number(b)}")
              for seed, a, b in jobs]
    (out_dir / "workflow_api.json").write_text(json.dumps(graphs[0], indent=2))
    written.append(out_dir / "workflow_api.json")
    reports = []
    cells: dict = {}
    first_entry = None
    for n, ((seed, a, b), graph) in enumerate(zip(jobs, graphs)):
        label = (f"[{n + 1}/{len(jobs)}] seed {seed}"
                 + (f" alpha {short_number(a)} beta {short_number(b)}" if args.grid else ""))
        prompt_id = server.post_prompt(graph)
        progress.start(label)
        t0 = time.monotonic()
        entry = server.wait(prompt_id, timeout=args.timeout, on_event=progress, events=events)
        progress.done(f"done in {time.monotonic() - t0:.1f} s")
        first_entry = first_entry or entry
        report = _report_text(entry)
        if args.grid:
            stem = f"alpha{short_number(a)}_beta{short_number(b)}_seed{seed}"
            cells[(seed, a, b)] = (_save_first(server, entry, IDS["save"], out_dir / "grid" / f"{stem}.png"),
                                   _save_first(server, entry, IDS["map"], out_dir / "grid" / f"map_{stem}.png"))
            if seed == args.seeds[0]:
                reports.append(f"== alpha {short_number(a)}, beta {short_number(b)} ==\n{report}")
        else:
            written.append(_save_first(server, entry, IDS["save"], out_dir / f"klora_seed{seed}.png"))
            if not reports:
                reports.append(report)
    written.append(_save_first(server, first_entry, IDS["map"], out_dir / "selection_map.png"))
    if args.grid:
        written.append(out_dir / "grid")
        for seed in args.seeds:
            title = f"K-LoRA, pattern {args.pattern}, seed {seed}, {args.steps} steps: rows alpha, columns beta"
            sheet = contact_sheet({(a, b): cells[(seed, a, b)] for a in alphas for b in betas}, alphas, betas,
                                  title, out_dir / f"grid_seed{seed}.png")
            written.append(sheet)
    report_path = out_dir / "report.txt"
    report_path.write_text("\n\n".join(reports) + "\n")
    written.append(report_path)
    for line in reports[0].splitlines():
        if line.startswith("gamma") or "switch per step" in line:
            say(line)
    return written


def _save_first(server: ComfyUIServer, entry: dict, node_id: str, dest: Path) -> Path:
    """Copy the first image node ``node_id`` saved (per the history ``entry``) to ``dest``."""
    images = ((entry.get("outputs") or {}).get(node_id) or {}).get("images") or []
    if not images:
        raise ServerError(f"ComfyUI saved no image for node {node_id}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(server.fetch_output(images[0]))
    return dest


def _report_text(entry: dict) -> str:
    """K-LoRA Fuse's report (its STRING output) from a history entry."""
    text = ((entry.get("outputs") or {}).get(IDS["fuse"]) or {}).get("text") or []
    return "\n".join(str(t) for t in text) if isinstance(text, list) else str(text)
