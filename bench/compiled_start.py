"""What a start with a warm compile cache still pays for a compiled frame: the first compiled frame's time,
split by torch.compile's own phase timers (Dynamo's tracing, loading the compiled code).

    python bench/compiled_start.py [--shape tiny|1b|2b] [--device cpu|cuda] [--json OUT]

Two fresh processes run the same compiled serving frame (dia2_worker.bench.frame_call, random weights, bf16,
batch 1) against one Inductor cache directory: the first fills it (compiling, unless it is already filled),
the second is the measured start: every graph should be a cache hit, so what its first frame costs is what
the cache does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("bytecode_tracing", "OutputGraph.call_user_compiler", "AOTAutogradCache.inductor_load", "build_guards")


def child(shape: str, device: str) -> dict:
    """One process: the first and second compiled frame, timed, with torch.compile's phase timers."""
    import torch
    from torch._dynamo.utils import compile_times, counters

    from dia2_worker import bench

    engine = bench.build_engine(shape, torch.device(device), torch.bfloat16, 0)
    engine.model.set_batch_invariant(False)
    frame = bench.frame_call(engine, 1, 0, compile=True)
    started = time.perf_counter()
    frame()
    first = time.perf_counter() - started
    started = time.perf_counter()
    frame()
    second = time.perf_counter() - started
    names, values = compile_times(repr="csv", aggregate=True)
    times = dict(zip(names, map(float, values)))
    return {"first_frame_s": first, "second_frame_s": second,
            "phases_s": {name: times.get(name) for name in PHASES},
            "inductor": dict(counters["inductor"])}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/compiled_start.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "2b"), default="2b")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.shape, args.device)))
        return
    import torch

    from dia2_worker.mimi.bench import machine

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR")
           or tempfile.mkdtemp(prefix="dia2-compiled-start-")}
    runs = []
    for name in ("filling the cache", "the measured start"):
        print(f"compiled_start: {name} ({args.shape} on {args.device})", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", "--shape", args.shape, "--device", args.device],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"compiled_start: the {name} process failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {"benchmark": "dia2 compiled start", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "shape": args.shape, "device": args.device, "machine": machine(torch.device(args.device)),
              "filling": runs[0], "start": runs[1]}
    start = runs[1]
    print(f"{args.shape}: first compiled frame of a start with a warm cache {start['first_frame_s']:.1f} s "
          f"(Dynamo tracing {start['phases_s']['bytecode_tracing'] or 0:.1f} s, loading compiled code "
          f"{start['phases_s']['AOTAutogradCache.inductor_load'] or 0:.1f} s), then {start['second_frame_s']:.2f} s "
          f"a frame; cache {start['inductor']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
