# SPDX-License-Identifier: GPL-3.0-or-later
"""Flips benchmark: K-LoRA on a full-size SDXL UNet, flips one by one / batched / kept variants vs a merge.

    bash bench/flips.sh [--device cpu|cuda] [--sizes 256 512] [--rounds 3] [--quick]

One timing process (bench/flips_workers.py) builds the UNet (bench/sdxl_full.py:
2.57 B parameters, seeded random weights in a mapped file), a kohya LoRA
pair of ranks 16 / 64 on all 560 attention projections, a K-LoRA Fuse model
and a direct merge (ComfyUI's ``load_lora_for_models``, both LoRAs).  Every
round samples one image per method, order rotated per round:

- ``merge``; K-LoRA ``one by one`` (ComfyUI's per-weight re-bake),
  ``batched`` (nodes/batched_bake.py), ``kept, first image`` (kept variants
  just turned on, or right after ComfyUI re-patched the model: every flip
  computes once) and
  ``kept`` (the next image: every flip is a swap).

Times are steady state: the sample call minus ComfyUI's model (re)load in
PREPARE_SAMPLING (the methods share one base model, so ComfyUI re-patches
when the method changes), wall and process CPU seconds.  Flip time (at the
steps) and restore time (after sampling) come from wrapping the run's
``rebake`` / ``restore``.  The three K-LoRA ways must give bit-identical
latents (checked every round).  Then one process per method measures peak
memory (CPU: peak RSS; CUDA: peak allocated).  Results: bench/results/
<date>-flips-[<sizes>px-]<device>[-quick].json and .md; the table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sdxl_full  # noqa: E402

GOAL_KEPT = 1.02  # K-LoRA with kept variants / merge, CPU seconds at 256 px
GOAL_MEMORY = 1.10  # peak memory with kept variants off / merge


def run_worker(argv: list, json_path: Path, device: str) -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0")
    if device == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--json", str(json_path)] + argv
    common.log("running " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"worker {' '.join(argv)} failed with exit status {proc.returncode}")
    return json.loads(json_path.read_text())


def _arguments():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=sdxl_full.DTYPES, default="fp32", help="stored weight dtype (default fp32)")
    ap.add_argument("--sizes", type=int, nargs="+", help="image sizes in px (default 256)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run on the tests' tiny SDXL-shaped UNet")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory processes")
    ap.add_argument("--out-dir", default=str(common.BENCH_DIR / "results"))
    ap.add_argument("--date", default=None)
    ap.add_argument("--table-from", metavar="JSON", help="only re-render the table of an earlier results JSON")
    ap.add_argument("--worker", choices=("weights", "time", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--weights-file", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=("merge", "batched", "kept"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    return ap.parse_args()


def _run_all(args, res: dict) -> None:
    """The weights file, the timing process, then one memory process per method (one at a time)."""
    passthrough = ["--device", args.device, "--dtype", args.dtype] + (["--quick"] if args.quick else [])
    passthrough += (["--sizes", *map(str, args.sizes)] if args.sizes else [])
    passthrough += (["--rounds", str(args.rounds)] if args.rounds else [])
    with tempfile.TemporaryDirectory(prefix="klora-flips-") as tmp:
        # The weights, once, in a file every process maps (page cache, not anonymous memory).
        weights = Path(tmp) / "sdxl-unet.bin"
        run_worker(["--worker", "weights", "--weights-file", str(weights)] + passthrough, Path(tmp) / "weights.json",
                   args.device)
        passthrough += ["--weights-file", str(weights)]
        res["time"] = run_worker(["--worker", "time"] + passthrough, Path(tmp) / "time.json", args.device)
        res["memory"] = {}
        for method in () if args.no_memory else ("merge", "batched", "kept"):
            res["memory"][method] = run_worker(["--worker", "memory", "--method", method] + passthrough,
                                               Path(tmp) / f"mem-{method}.json", args.device)


def main() -> int:
    args = _arguments()
    if args.worker:
        import flips_workers

        return flips_workers.main(args)
    import flips_table

    if args.table_from:
        print(flips_table.render(json.loads(Path(args.table_from).read_text())), end="")
        return 0
    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    sizes = "-".join(map(str, args.sizes or [])) + "px-" if args.sizes else ""
    stem = f"{date}-flips-{sizes}{args.device}" + ("-quick" if args.quick else "")
    command = "bash bench/flips.sh " + " ".join(a for a in sys.argv[1:] if not a.startswith("--out-dir"))
    res = {"date": date, "command": command.strip(), "machine": dict(common.machine(), device=args.device),
           "quick": args.quick, "goals": {"kept_over_merge_cpu_256": GOAL_KEPT, "memory_over_merge": GOAL_MEMORY}}
    t0 = time.perf_counter()
    _run_all(args, res)
    res["total_seconds"] = time.perf_counter() - t0
    res["table_markdown"] = table = flips_table.render(res)
    out_dir = Path(args.out_dir)
    common.write_json(out_dir / f"{stem}.json", res)
    (out_dir / f"{stem}.md").write_text(table)
    common.log(f"wrote {out_dir / (stem + '.json')} ({res['total_seconds']:.0f} s)")
    print(table, end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
