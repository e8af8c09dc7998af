"""The naive cold start, the baseline `python -m dia2_worker.coldstart --baseline` compares the worker with.

    DIA2_STARTUP_REPORT=report.json MODEL_DIR=... python bench/naive_start.py

What a straightforward worker does, one step after another on one thread: import everything up front (the
RunPod SDK with its full CPU probe, the storage client, the model stack), read every weight as float32 on
the host, move it to the device, cast it, build the scheduler, and take the first job with nothing warmed
up. It writes the same start-up report as `handler.py` (phases on the process clock, then one job timed
to its first audio), so the two are compared phase by phase.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dia2_worker.timing import PHASES  # noqa: E402

IMPORTS = ("runpod", "torch", "boto3", "numpy", "soundfile", "tokenizers", "safetensors", "transformers")


def load_engine(model_dir: Path, device: str, dtype: str):
    """The engine, its weights read as float32 on the host, then moved, then cast."""
    import torch

    from dia2_worker.checkpoint import build_model, engine_shapes, read_manifest, read_safetensors
    from dia2_worker.config import Dia2Config
    from dia2_worker.engine import Dia2Engine
    from dia2_worker.mimi import load_mimi
    from dia2_worker.text import Dia2Tokenizer

    if read_manifest(model_dir) is None:
        raise SystemExit(f"{model_dir}: the naive start reads the serving layout (bake_weights.py writes it)")
    with PHASES.phase("config"):
        config = Dia2Config.load(model_dir / "config.json")
    with PHASES.phase("tokenizer"):
        tokenizer = Dia2Tokenizer.from_dir(model_dir)
    with PHASES.phase("weights read (fp32, host)"):
        host = read_safetensors(model_dir / "model.safetensors", engine_shapes(config), torch.device("cpu"),
                                torch.float32)
    with PHASES.phase("weights to device + cast"):
        tensors = {name: t.to(device).to(getattr(torch, dtype)) for name, t in host.items()}
    with PHASES.phase("model"):
        model = build_model(config, tensors)
    with PHASES.phase("mimi"):
        codec = load_mimi(model_dir / "mimi", device=device, dtype=getattr(torch, dtype))
    return Dia2Engine(config, model, tokenizer, codec, torch.device(device))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in IMPORTS:
        if importlib.util.find_spec(name) is not None:
            with PHASES.phase(f"import {name}"):
                importlib.import_module(name)
    from dia2_worker.jobs import WorkerLimits
    from dia2_worker.storage import StorageSettings, make_storage
    from dia2_worker.worker import WorkerService, WorkerSettings

    env = os.environ
    settings = WorkerSettings.from_env(env)
    storage_settings = StorageSettings.from_env(env)
    engine = load_engine(settings.model_dir, settings.device, settings.dtype)
    storage = make_storage(storage_settings)
    service = WorkerService.serving(engine, env, settings, WorkerLimits.from_env(env), lambda: storage,
                                    storage_settings.output_dir)
    service.write_startup_report(env["DIA2_STARTUP_REPORT"])


if __name__ == "__main__":
    main()
