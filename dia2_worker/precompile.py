"""Make a model directory's compile cache for this machine's device: the worker's own start (settings from the
environment, load, warm-up through the scheduler) with torch.compile forced on, compiling into the cache, whose
artifacts are then saved (see compile_cache.py). `bake_weights.py --compile-cache` runs it after a bake.

    python -m dia2_worker.precompile --model-dir /models/dia2 [--device cuda]

The cache fits workers started with the same settings: DTYPE, MAX_PREFIX_AUDIO_S and SLOTS (unset: the
worker's default for the device, which a worker then takes from the cache when its memory holds as many) are
read from the environment as the worker reads them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.precompile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="the model directory (a bake)")
    parser.add_argument("--device", help="the device to compile for: cuda when available, else cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.model_dir(args.model_dir, "--model-dir")
    from . import compile_cache
    from .worker import WorkerService, _default_device, set_up_process

    device = cli.device(args.device, "--device") if args.device else _default_device()
    set_up_process()
    started = time.monotonic()
    directory = compile_cache.location(args.model_dir, device)
    with tempfile.TemporaryDirectory(prefix="dia2-precompile-") as scratch:
        env = {name: value for name, value in os.environ.items() if not name.startswith("BUCKET_")}
        env.update(MODEL_DIR=str(args.model_dir), DEVICE=device, TORCH_COMPILE="true", OUTPUT_DIR=scratch)
        compile_cache.begin(directory)
        try:
            service = WorkerService.load(env)
            try:
                tally = service.compile_tally()
                made = compile_cache.Made(key=compile_cache.device_key(device), dtype=service.settings.dtype,
                                          slots=service.scheduler.slots, length=service.scheduler.runner.state.length,
                                          graphs=tally.graphs)
            finally:
                service.scheduler.close()
            compile_cache.save(directory, made)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    print(f"{directory}: {made.graphs} graphs for {made.slots} slots of {made.length} frames ({made.dtype}) "
          f"in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, None, "python -m dia2_worker.precompile"))
