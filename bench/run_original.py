"""Run the original nari-labs Dia2 runtime on the benchmark's random-weight checkpoint; print one JSON object.

    python bench/run_original.py --src DIR --shape tiny|1b|2b --device cpu|cuda --seed S --script TEXT
                                 [--cfg-scale S] [--cfg-filter-k K] [--cuda-graph] [--torch-compile]
                                 [--count-kernels] [--threads T]

`python -m dia2_worker.bench --modes original` runs this in a subprocess, so `dia2_worker` never imports the
original (or transformers). The checkpoint is the one the benchmark's engine is built from (the same seeded
random tensors, drawn in float32 on the same device), written in the published layout with the demo
tokenizer, and a random Mimi in transformers' layout. The generation is greedy. Its final Mimi decode is
skipped (the comparison is of tokens and step time); the generation loop is timed as a whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dia2_worker import bench  # noqa: E402
from dia2_worker.checkpoint import _split_shapes  # noqa: E402
from dia2_worker.config import Dia2Config  # noqa: E402
from dia2_worker.random_model import demo_tokenizer, random_dia2_tensors, tokenizer_files  # noqa: E402


def write_published(directory: Path, shape: str, device: torch.device, seed: int) -> None:
    """config.json, model.safetensors (published tensor names), the tokenizer and a random Mimi."""
    from safetensors.torch import save_file
    from transformers import MimiConfig, MimiModel

    config_dict, mimi_config = bench.configs(shape)
    config = Dia2Config.from_dict(config_dict)
    (directory / "config.json").write_text(json.dumps(config_dict))
    published = {}
    for name, tensor in random_dia2_tensors(config, seed, device, torch.float32).items():
        parts = _split_shapes(name, tuple(tensor.shape), config)
        for (part, _), value in zip(parts, tensor.cpu().split([s[0] for _, s in parts])):
            published[part] = value.contiguous()
    save_file(published, str(directory / "model.safetensors"))
    for name, text in tokenizer_files(demo_tokenizer()).items():
        (directory / name).write_text(text)
    torch.manual_seed(seed)
    MimiModel(MimiConfig(**mimi_config)).save_pretrained(str(directory / "mimi"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--shape", choices=bench.SHAPES, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--script", required=True)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--cfg-filter-k", type=int, default=50)
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--count-kernels", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (the benchmark passes its own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.src))
    import dia2.engine
    from dia2 import GenerationConfig, SamplingConfig

    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    loops: list[tuple[float, int]] = []
    run_loop = dia2.engine.run_generation_loop

    def timed_loop(runtime, *, start_step: int = 0, **kwargs):
        """The generation loop alone, timed; its step count is the trimmed buffer's length less one."""
        started = time.perf_counter()
        first_word_frame, audio = run_loop(runtime, start_step=start_step, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        loops.append((time.perf_counter() - started, audio.shape[-1] - 1 - start_step))
        return first_word_frame, audio

    dia2.engine.run_generation_loop = timed_loop
    dia2.engine.decode_audio = lambda runtime, tokens: torch.zeros(1, 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp)
        write_published(ck, args.shape, device, args.seed)
        model = dia2.engine.Dia2.from_local(ck / "config.json", ck / "model.safetensors", device=args.device,
                                            dtype=dtype, tokenizer_id=str(ck), mimi_id=str(ck / "mimi"))
        options = dict(use_cuda_graph=args.cuda_graph, use_torch_compile=args.torch_compile)
        config = GenerationConfig(text=SamplingConfig(temperature=0.0), audio=SamplingConfig(temperature=0.0),
                                  cfg_scale=args.cfg_scale, cfg_filter_k=args.cfg_filter_k, **options)
        model.generate(args.script, config=config)  # warm-up (and capture or compilation)
        result = model.generate(args.script, config=config)
        seconds, steps = loops[-1]
        kernels = None
        if args.count_kernels:
            eager = GenerationConfig(text=config.text, audio=config.audio, cfg_scale=config.cfg_scale,
                                     cfg_filter_k=config.cfg_filter_k)
            kernels = count_kernels(lambda: model.generate(args.script, config=eager), device) / loops[-1][1]
    print(json.dumps({
        "dtype": dtype, "options": options, "frames": steps, "ms_per_frame": 1000 * seconds / steps,
        "kernels_per_frame": kernels, "tokens": result.audio_tokens[0].tolist(),
        "timestamps": [[word, time_s] for word, time_s in result.timestamps],
    }))


def count_kernels(call, device: torch.device) -> float:
    """Kernels (CUDA) or leaf operators (CPU) of a whole eager generation, counted as for our engine."""
    from dia2_worker import kernels

    if device.type == "cuda":
        return sum(kernels.count_cuda_kernels(call).values())
    with kernels.count_operators() as counter:
        call()
    return sum(counter.counts.values())


if __name__ == "__main__":
    main()
