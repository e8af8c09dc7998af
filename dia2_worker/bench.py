"""Dia2 generation speed per execution mode, side by side, on random weights of the published shapes.

  python -m dia2_worker.bench [--shape tiny|1b|2b] [--frames N] [--modes eager-fp32,eager-bf16,graph,...]
                              [--concurrency 1,2,4,...] [--kernels [--batch 1,64] [--no-compile]]
                              [--original-src DIR]
                              [--device cpu|cuda] [--seed S] [--threads T] [--json OUT]

Every speed-up is a ratio measured in one run, so each mode is one switch away from the next: `eager-fp32`
is our engine in float32 with outputs read back two steps late, `eager-bf16` halves the bytes, `graph`
replays the whole step as one CUDA graph, `graph-compiled` fuses its kernels with torch.compile. Per mode:
ms per frame (p50/p90 of the interval between step completions, CUDA events on a GPU), an eager profiling
pass that splits a step into backbone / depformer / the rest (CFG, sampling, text machine, bookkeeping),
one streaming Mimi decode call per frame, RTF, time to first audio (submit -> first PCM on the host) and
peak GPU memory; and token checks: greedy and seeded tokens equal to the first mode of the same dtype,
seeded sampling repeating exactly. `original` runs the original nari-labs runtime (its source from
--original-src) on the same checkpoint and a greedy script, beside our engine on the same script: ms per
frame, kernels per frame and whether the tokens match. `--concurrency` instead runs one mode at each
batch size: the same timings, audio seconds per wall second, whether the batch keeps real time, and the
time to first audio of a job joining the loaded batch. `--kernels` counts the kernels of a serving frame
(see dia2_worker.kernels) at each `--batch` size, as written and compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .engine import Dia2Engine, GenerationParamError, GenerationParams, GenerationPlan, GenerationRequest
from .graphs import capture, cover, kv_buckets
from .mimi.bench import machine
from .mimi.streaming import StreamingDecoder
from .random_model import DEMO_CONFIG, DEMO_MIMI_CONFIG, random_engine
from .batch import BatchRunner, Emitted, RunMode, Slot, compiled
from .shapes import parameter_count, published_config

SHAPES = ("tiny", "1b", "2b")
WARMUP_FRAMES = 3
"""Untimed steps before timing (allocator, kernel and library warm-up); token checks cover them too."""
TTFA_REPEATS = 3
"""Time to first audio is the median of this many joins."""
LAG = 2
"""Steps in flight before their outputs are read back."""
SCRIPT = ("[S1] Hello there, how have you been lately? [S2] Busy, honestly, but the new project is going "
          "well and we ship next week.")
ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = "original"
"""The mode that runs the original runtime (bench/run_original.py, in a subprocess)."""
DEFAULT_ORIGINAL_SRC = ROOT.parent / "shared" / "reference" / "nari-dia2"


@dataclass(frozen=True)
class Mode:
    """How a step is executed; the model and its tokens are the same in every mode of one dtype."""

    dtype: torch.dtype
    run: RunMode  # as the serving scheduler runs it (graphs: the Mimi decode step is replayed as a graph too)


MODES = {
    "eager-fp32": Mode(torch.float32, RunMode(lag=LAG)),
    "eager-bf16": Mode(torch.bfloat16, RunMode(lag=LAG)),
    "graph": Mode(torch.bfloat16, RunMode(graphs=True, lag=LAG)),
    "graph-compiled": Mode(torch.bfloat16, RunMode(graphs=True, compile=True, lag=LAG)),
}
MODE_NAMES = (*MODES, ORIGINAL)


def default_modes(device: torch.device, concurrency: bool) -> list[str]:
    """Everything the device runs well: graphs need CUDA, and bf16 on a CPU is emulated and slow. Compiling
    takes minutes and the original runtime runs whole generations (minutes on a CPU for 2B): ask for them."""
    if concurrency:
        return ["graph" if device.type == "cuda" else "eager-fp32"]
    if device.type == "cuda":
        return [name for name, mode in MODES.items() if not mode.run.compile]
    return ["eager-fp32"]


def original_available(src: Path) -> bool:
    return (src / "dia2" / "__init__.py").is_file()


class Clock:
    """Marks on the device's timeline: CUDA events (recorded without waiting for the GPU), else perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
        """Milliseconds between two marks (on CUDA, after `sync`)."""
        return start.elapsed_time(end) if self.cuda else 1000 * (end - start)

    def each(self, call: Callable[[], object], count: int) -> list[float]:
        """ms from one call's completion to the next's, over `count` calls: what a call costs in a loop,
        waits and host work included, even when the calls run ahead of the device."""
        marks = [self.mark()]
        for _ in range(count):
            call()
            marks.append(self.mark())
        self.sync()
        return [self.ms(a, b) for a, b in zip(marks, marks[1:])]


def configs(shape: str) -> tuple[dict, dict]:
    """Dia2 and Mimi config dicts: "tiny" is the demo model and codec; 1b/2b the published shapes with
    kyutai/mimi's real codec shape (an empty Mimi config is MimiConfig's defaults, the published values)."""
    return (DEMO_CONFIG, DEMO_MIMI_CONFIG) if shape == "tiny" else (published_config(shape), {})


def build_engine(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> Dia2Engine:
    """Random weights of `configs(shape)`."""
    engine = random_engine(*configs(shape), device, dtype, seed)
    # random_mimi assigns the weights on `device` but leaves RoPE's non-persistent `inv_freq` buffer on the
    # CPU, where the meta-device skeleton builds it; decoding on a GPU needs it moved.
    engine.codec.to(device)
    return engine


def longest_script(engine: Dia2Engine) -> str:
    """The longest repetition of SCRIPT that fits the model's context, so no generation ends during a run."""
    words = SCRIPT.split() * (engine.config.runtime.max_context_steps // len(SCRIPT.split()) + 1)

    def fits(count: int) -> bool:
        try:
            engine.check(GenerationRequest(" ".join(words[:count])))
        except GenerationParamError:
            return False
        return True

    low, high = 1, len(words)  # every word takes at least two frames, so all of them cannot fit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return " ".join(words[:low])


def requests(engine: Dia2Engine, seed: int) -> dict[str, GenerationRequest]:
    """The two generations every mode runs: seeded sampling (the default settings, CFG included) and greedy."""
    script = longest_script(engine)
    return {
        "sampled": GenerationRequest(script, GenerationParams(seed=seed)),
        "greedy": GenerationRequest(script, GenerationParams(text_temperature=0.0, audio_temperature=0.0, seed=seed)),
    }


def new_runner(engine: Dia2Engine, mode: Mode, batch: int) -> BatchRunner:
    return BatchRunner(engine, batch, engine.buffer_length(), decode_audio=False,
                       mode=mode.run)


def _run(runner: BatchRunner, plans: list[GenerationPlan], steps: int, clock: Clock) -> tuple[list[Slot], list[float]]:
    """Join every plan, then step the batch `steps` times: the slots and the ms of each step."""
    slots = [runner.join(plan)[0] for plan in plans]
    ms = clock.each(progress(runner.step, steps, f"{steps} steps"), steps)
    _check_running(slots)
    return slots, ms


def _check_running(slots: list[Slot]) -> None:
    if any(slot.finished for slot in slots):
        raise RuntimeError("a generation reached the end of the model's context during the run: ask for fewer frames")


def tokens(runner: BatchRunner, plan: GenerationPlan, steps: int, clock: Clock) -> torch.Tensor:
    """Audio tokens [C, steps] a generation samples in its first `steps` frames (every codebook, delayed
    layout: column t is what frame t drew). Text decisions feed the next frame's input, so they show too."""
    (slot,), _ = _run(runner, [plan], steps, clock)
    drawn = _drawn(runner, slot, steps)
    runner.leave(slot)
    return drawn


def _drawn(runner: BatchRunner, slot: Slot, steps: int) -> torch.Tensor:
    """A copy (on a CPU, `.cpu()` would be a view the row's next generation overwrites)."""
    return runner.state.audio[slot.row, :, 1: steps + 1].to("cpu", copy=True)


def first_audio_ms(runner: BatchRunner, engine: Dia2Engine, request: GenerationRequest,
                   decoder: StreamingDecoder) -> float:
    """Submit -> first PCM frame on the host: plan, join, step until the job's first frame, decode it."""
    start = time.perf_counter()
    slot, emitted = runner.join(engine.prepare(request))
    while not emitted.frames:
        if emitted.finished:
            raise RuntimeError("the generation ended before its first frame")
        emitted = runner.step().get(slot, Emitted())
    decoder.reset()
    decoder.decode(emitted.frames[0].tokens.view(1, -1, 1)).cpu()
    elapsed = time.perf_counter() - start
    runner.leave(slot)
    return 1000 * elapsed


def split_ms(engine: Dia2Engine, plan: GenerationPlan, frames: int, clock: Clock) -> dict[str, float]:
    """Median ms per frame of the backbone, the depformer (all stages) and the rest of the step (CFG, sampling,
    text state machine, delay bookkeeping), from an eager pass of `engine.step` with marks around
    each model call. A graph replay has no such boundaries: graph mode reports its dtype's eager split."""
    state = engine.new_state(1, plan.buffer_length)
    engine.start(state, 0, plan)
    # The cache length a runner's attention reads over these steps (the timed modes read the same).
    kv_len = cover(kv_buckets(state.length), min(plan.start_frame + plan.slot_shift + WARMUP_FRAMES + frames,
                                                 state.length))
    opened: list[torch.cuda.Event | float] = []
    spans: list[dict[str, list]] = []

    def open_span(module, args) -> None:
        opened.append(clock.mark())

    def close_span(part: str) -> Callable:
        def hook(module, args, output) -> None:
            spans[-1][part].append((opened.pop(), clock.mark()))
        return hook

    model = engine.model
    hooks = [model.transformer.register_forward_pre_hook(open_span),
             model.transformer.register_forward_hook(close_span("backbone")),
             model.depformer.register_forward_pre_hook(open_span),
             model.depformer.register_forward_hook(close_span("depformer"))]
    try:
        for _ in range(WARMUP_FRAMES + frames):
            spans.append({"backbone": [], "depformer": []})
            start = clock.mark()
            engine.step(state, kv_len)
            spans[-1]["step"] = [(start, clock.mark())]
    finally:
        for hook in hooks:
            hook.remove()
    clock.sync()
    per_step = [{part: sum(clock.ms(a, b) for a, b in marks) for part, marks in step.items()}
                for step in spans[WARMUP_FRAMES:]]
    for step in per_step:
        step["sampling"] = step["step"] - step["backbone"] - step["depformer"]
    return {part: statistics.median(step[part] for step in per_step)
            for part in ("step", "backbone", "depformer", "sampling")}


def codec_ms(engine: Dia2Engine, batch: int, frames: int, graphed: bool, clock: Clock) -> float:
    """Median ms of one streaming Mimi decode call turning a frame of `batch` rows into PCM."""
    codec = engine.codec
    decoder = codec.streaming_decoder(batch)
    codes = torch.randint(0, codec.codebook_size, (batch, engine.config.num_codebooks, 1), device=codec.device)
    decode = capture(lambda: decoder.step(codes), WARMUP_FRAMES)[0] if graphed else (lambda: decoder.step(codes))
    clock.each(decode, WARMUP_FRAMES)
    decoder.reset()
    return statistics.median(clock.each(decode, frames))


def measure(engine: Dia2Engine, mode: Mode, batch: int, frames: int, request: GenerationRequest,
            clock: Clock) -> tuple[dict[str, float], BatchRunner, torch.Tensor]:
    """`batch` generations (seeds seed, seed + 1, ...) stepped together for WARMUP_FRAMES + `frames` steps,
    then the time to first audio of a job joining while the other batch - 1 keep running, and the streaming
    decode of a frame of `batch` rows. Returns the timings, the runner (all slots free) and row 0's tokens."""
    runner = new_runner(engine, mode, batch)
    plans = [engine.prepare(replace(request, params=replace(request.params, seed=request.params.seed + row)))
             for row in range(batch)]
    steps = WARMUP_FRAMES + frames
    slots, ms = _run(runner, plans, steps, clock)
    drawn = _drawn(runner, slots[0], steps)
    runner.leave(slots[-1])
    decoder = engine.codec.streaming_decoder(1)
    decoder.decode(torch.zeros(1, engine.config.num_codebooks, 1, dtype=torch.long))  # warm-up
    ttfa = [first_audio_ms(runner, engine, request, decoder) for _ in range(TTFA_REPEATS)]
    _check_running(slots[:-1])
    for slot in slots[:-1]:
        runner.leave(slot)
    timed = ms[WARMUP_FRAMES:]
    return {
        "ms_per_frame_p50": float(np.percentile(timed, 50)),
        "ms_per_frame_p90": float(np.percentile(timed, 90)),
        "ms_per_frame_mean": statistics.fmean(timed),
        "codec_ms_per_frame": codec_ms(engine, batch, frames, mode.run.graphs, clock),
        "ttfa_ms": statistics.median(ttfa),
    }, runner, drawn


def entry(engine: Dia2Engine, shape: str, name: str, batch: int, frames: int, timings: dict[str, float],
          split: dict[str, float] | None = None, checks: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `results` entry; peak memory is what the device has held since the entry's `_reset_peak`.

    RTF and real time count the codec too: a served frame is a step plus its decode."""
    device, mode = engine.device, MODES[name]
    frame_ms = 1000 * engine.codec.frame_size / engine.codec.sample_rate
    codec = timings["codec_ms_per_frame"]
    return {
        "device": device_name(device), "shape": shape, "mode": name, "dtype": str(mode.dtype).removeprefix("torch."),
        "batch": batch, "frames": frames, **timings,
        "codec_graphed": mode.run.graphs,
        "batch_invariant": engine.batch_invariant,  # the numerics policy (model.set_batch_invariant)
        "split_ms": split,
        "rtf": (timings["ms_per_frame_p50"] + codec) / frame_ms,
        "audio_s_per_wall_s": batch * frame_ms / (timings["ms_per_frame_mean"] + codec),
        "realtime": timings["ms_per_frame_p90"] + codec <= frame_ms,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "checks": checks,
    }


class Engines:
    """One engine at a time, rebuilt when the dtype changes: the 2B weights in two dtypes at once would crowd
    a CPU host and inflate the peak memory a mode reports."""

    def __init__(self, shape: str, device: torch.device, seed: int) -> None:
        self.shape, self.device, self.seed = shape, device, seed
        self.engine: Dia2Engine | None = None

    def get(self, dtype: torch.dtype) -> Dia2Engine:
        if self.engine is None or self.engine.dtype != dtype:
            self.engine = None
            _release(self.device)
            self.engine = build_engine(self.shape, self.device, dtype, self.seed)
        return self.engine


def mode_entry(engine: Dia2Engine, shape: str, name: str, frames: int, seed: int, clock: Clock,
               baseline: tuple[str, dict[str, torch.Tensor]] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One stream in mode `name`: timings, the eager split, and token checks against `baseline` (the name and
    tokens of the first mode of this dtype; None: this is that mode). Returns the entry and the tokens."""
    mode, steps = MODES[name], WARMUP_FRAMES + frames
    reqs = requests(engine, seed)
    _reset_peak(engine.device)
    timings, runner, sampled = measure(engine, mode, 1, frames, reqs["sampled"], clock)
    drawn = {"sampled": sampled, "greedy": tokens(runner, engine.prepare(reqs["greedy"]), steps, clock)}
    again = tokens(runner, engine.prepare(reqs["sampled"]), steps, clock)
    del runner  # its state (and graph) before the split pass allocates another
    split = split_ms(engine, engine.prepare(reqs["greedy"]), frames, clock)
    base_name, base = baseline or (None, None)
    checks = {
        "baseline": base_name,
        "greedy_matches_baseline": None if base is None else torch.equal(drawn["greedy"], base["greedy"]),
        "sampled_matches_baseline": None if base is None else torch.equal(sampled, base["sampled"]),
        "sampling_repeats": torch.equal(sampled, again),
    }
    return entry(engine, shape, name, 1, frames, timings, split, checks), drawn


def batch_entry(engine: Dia2Engine, shape: str, name: str, batch: int, frames: int, seed: int,
                clock: Clock) -> dict[str, Any]:
    """`batch` streams stepped together in mode `name`."""
    _reset_peak(engine.device)
    timings, _, _ = measure(engine, MODES[name], batch, frames, requests(engine, seed)["sampled"], clock)
    return entry(engine, shape, name, batch, frames, timings)


def greedy_run(engine: Dia2Engine, mode: Mode, request: GenerationRequest,
               clock: Clock) -> tuple[torch.Tensor, list[float]]:
    """One generation run to its end in `mode`: its output tokens [C, T] and the ms of each step."""
    runner = new_runner(engine, mode, 1)
    slot, emitted = runner.join(engine.prepare(request))
    frames = [f.tokens for f in emitted.frames]
    marks = [clock.mark()]
    while not emitted.finished:
        emitted = runner.step().get(slot, Emitted())
        frames += [f.tokens for f in emitted.frames]
        marks.append(clock.mark())
    clock.sync()
    C = engine.config.num_codebooks
    tokens = torch.stack(frames, dim=1) if frames else torch.zeros(C, 0, dtype=torch.long)
    return tokens, [clock.ms(a, b) for a, b in zip(marks, marks[1:])]


def run_original(src: Path, shape: str, device: torch.device, seed: int, script: str, options: dict[str, bool],
                 ) -> dict[str, Any]:
    """bench/run_original.py in a subprocess (see there); its JSON report."""
    command = [sys.executable, str(ROOT / "bench" / "run_original.py"), "--src", str(src), "--shape", shape,
               "--device", device.type, "--seed", str(seed), "--script", script, "--count-kernels",
               "--threads", str(torch.get_num_threads())]
    command += [flag for flag, on in (("--cuda-graph", options["use_cuda_graph"]),
                                      ("--torch-compile", options["use_torch_compile"])) if on]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the original runtime failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def original_entry(engines: Engines, src: Path, seed: int, clock: Clock, compile_original: bool) -> dict[str, Any]:
    """The original runtime beside our engine, both greedy on SCRIPT from the same random checkpoint: ms per
    frame, kernels per frame (counted alike; ours without the streaming decode, which the original does not
    run per frame) and the tokens compared. On a GPU both run at their best: ours as
    graphs, the original with its own CUDA graphs (and torch.compile when asked); on a CPU both in float32."""
    device = engines.device
    ours_mode = "graph" if device.type == "cuda" else "eager-fp32"
    engine = engines.get(MODES[ours_mode].dtype)
    request = GenerationRequest(SCRIPT, GenerationParams(text_temperature=0.0, audio_temperature=0.0, seed=seed))
    ours, step_ms = greedy_run(engine, MODES[ours_mode], request, clock)
    options = {"use_cuda_graph": device.type == "cuda", "use_torch_compile": compile_original}
    theirs = run_original(src, engines.shape, device, seed, SCRIPT, options)
    kernels = kernel_entry(engine, engines.shape, 1, seed, gpu_path=False)["step_kernels_per_frame"]
    return {
        "device": device_name(device), "shape": engines.shape, "mode": ORIGINAL, "dtype": theirs["dtype"],
        "batch": 1, "frames": theirs["frames"], "original_options": options,
        "ms_per_frame": theirs["ms_per_frame"], "kernels_per_frame": theirs["kernels_per_frame"],
        "ours": {"mode": ours_mode, "frames": len(step_ms), "ms_per_frame_p50": float(np.percentile(step_ms, 50)),
                 "kernels_per_frame": kernels},
        "checks": {"greedy_matches_original": torch.equal(ours, torch.tensor(theirs["tokens"]))},
    }


def run_modes(engines: Engines, names: list[str], frames: int, seed: int, clock: Clock,
              original_src: Path | None = None, compile_original: bool = False) -> list[dict[str, Any]]:
    """One stream per mode; each mode's tokens are checked against the first mode of its dtype."""
    results, baselines = [], {}
    for name in names:
        if name == ORIGINAL:
            results.append(original_entry(engines, original_src, seed, clock, compile_original))
            continue
        dtype = MODES[name].dtype
        result, drawn = mode_entry(engines.get(dtype), engines.shape, name, frames, seed, clock, baselines.get(dtype))
        baselines.setdefault(dtype, (name, drawn))
        results.append(result)
        _release(engines.device)
    return results


def run_sweep(engines: Engines, names: list[str], batches: list[int], frames: int, seed: int,
              clock: Clock) -> list[dict[str, Any]]:
    """Each mode at each batch size."""
    results = []
    for name in names:
        for batch in batches:
            results.append(batch_entry(engines.get(MODES[name].dtype), engines.shape, name, batch, frames, seed, clock))
            _release(engines.device)
    return results


def run(shape: str, device: str | torch.device, modes: list[str] | None = None, frames: int = 200, seed: int = 0,
        concurrency: list[int] | None = None, original_src: Path | None = None,
        compile_original: bool = False) -> dict[str, Any]:
    """The whole benchmark as a JSON-ready report (modes: None for `default_modes`)."""
    target = torch.device(device)
    modes = modes or default_modes(target, bool(concurrency))
    check_modes(target, modes, bool(concurrency), original_src)
    engines, clock = Engines(shape, target, seed), Clock(target)
    started = time.perf_counter()
    if concurrency:
        results = run_sweep(engines, modes, concurrency, frames, seed, clock)
    else:
        results = run_modes(engines, modes, frames, seed, clock, original_src, compile_original)
    config = engines.engine.config
    realtime = [r["batch"] for r in results if r.get("realtime")]
    return {
        "benchmark": "dia2 generation",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": shape,
        "model": {"parameters": parameter_count(config), "codebooks": config.num_codebooks,
                  "max_delay": config.data.max_delay,
                  "mimi": "demo" if shape == "tiny" else "kyutai/mimi (MimiConfig defaults)",
                  "weights": f"random, seed {seed}"},
        "frames": frames,
        "warmup_frames": WARMUP_FRAMES,
        "seed": seed,
        "wall_s": time.perf_counter() - started,
        "machine": {**machine(target), "cuda": torch.version.cuda,
                    "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "results": results,
        "streams_realtime": (max(realtime) if realtime else 0) if concurrency else None,
    }


KERNEL_FRAMES = 2
"""Frames counted (after as many warm-up frames); the count is the same every frame."""
GRAPH_REPLAYS = 20
"""Replays of a frame's graph timed for the cost per kernel."""
KERNEL_STATE_FRAMES = 64
"""Buffer frames of the state the count steps: the count does not depend on the cache length, and a short
cache keeps batch 64 of the 2B shape within a CPU host's memory."""


def frame_call(engine: Dia2Engine, batch: int, seed: int, compile: bool = False) -> Callable[[], object]:
    """One serving frame for `batch` generations (default sampling settings, CFG on): the step of every row,
    then one streaming Mimi decode call for all of them; with `compile`, each of the two compiled as the
    serving path's `compile` mode compiles them."""
    base = engine.prepare(GenerationRequest(SCRIPT, GenerationParams(seed=seed)))
    state = engine.new_state(batch, KERNEL_STATE_FRAMES, *base.text.capacity)
    for row in range(batch):
        plan = engine.prepare(GenerationRequest(SCRIPT, GenerationParams(seed=seed + row)))
        engine.start(state, row, replace(plan, buffer_length=KERNEL_STATE_FRAMES))
    codec = engine.codec
    decoder = codec.streaming_decoder(batch)
    active = torch.ones(batch, dtype=torch.bool, device=engine.device)
    step, decode = engine.step, decoder.decode_step
    if compile:
        step, decode = compiled(step, 1), compiled(decode, 1)

    def frame() -> torch.Tensor:
        with torch.inference_mode():
            out = step(state, state.length)
            codes = out.frame_tokens.clamp(max=codec.codebook_size - 1).unsqueeze(-1)
            return decode(codes, active).flatten(1).float()

    return frame


def kernel_entry(engine: Dia2Engine, shape: str, batch: int, seed: int, gpu_path: bool = True,
                 compile: bool = False) -> dict[str, Any]:
    """Kernels per serving frame by region (see dia2_worker.kernels for how they are counted), on the GPU's code
    path (`gpu_path`; else the device's own), compiled as the serving path's `compile` mode does (`compile`)."""
    import torch._inductor.config

    from . import kernels

    with contextlib.ExitStack() as stack:
        if gpu_path:
            stack.enter_context(kernels.gpu_code_path(engine.model))
        if compile:  # each generated C++ kernel reports itself to the profiler (part of the compile cache's key)
            stack.enter_context(torch._inductor.config.patch({"cpp.enable_kernel_profile": True}))
        frame = frame_call(engine, batch, seed, compile)
        for _ in range(KERNEL_FRAMES):  # compiles, when compiling
            frame()
        graph_total = replay_ms = host_syncs = None
        counts: dict[str, float] = {}
        if engine.device.type == "cuda" or compile:
            for _ in range(KERNEL_FRAMES):
                for region, count in kernels.count_profiled_kernels(
                        frame, engine.device, outside="step" if compile else kernels.OTHER).items():
                    counts[region] = counts.get(region, 0) + count
        else:
            with kernels.count_operators() as counter:
                for _ in range(KERNEL_FRAMES):
                    frame()
            counts, host_syncs = dict(counter.counts), dict(counter.host_syncs)
        if engine.device.type == "cuda":
            replay, _ = capture(frame)
            graph_total = kernels.count_graph_kernels(replay)
            clock = Clock(engine.device)
            replay_ms = statistics.median(clock.each(replay, GRAPH_REPLAYS))
    regions = ("step", "codec decode") if compile else kernels.REGIONS
    by_region = {region: counts.get(region, 0) / KERNEL_FRAMES for region in regions}
    eager_total = sum(by_region.values())
    return {
        "device": device_name(engine.device), "shape": shape, "batch": batch,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "counted": ("CUDA kernels (profiler)" if engine.device.type == "cuda"
                    else "compiled kernels and operators (profiler)" if compile else "leaf operators"),
        "compiled": compile,
        "batch_invariant": False if gpu_path else engine.batch_invariant,
        "kernels_per_frame": graph_total if graph_total is not None else eager_total,
        "kernels_by_region": by_region,
        "step_kernels_per_frame": eager_total - by_region["codec decode"],
        "eager_kernels_per_frame": eager_total,
        "host_syncs_per_frame": None if host_syncs is None else sum(host_syncs.values()) / KERNEL_FRAMES,
        # CUDA: one replay of the frame's graph, and what each of its kernels costs on average.
        "graph_ms_per_frame": replay_ms,
        "graph_us_per_kernel": None if replay_ms is None else 1000 * replay_ms / graph_total,
    }


def run_kernels(shape: str, device: str | torch.device, batches: list[int], seed: int = 0,
                compile: bool = True) -> dict[str, Any]:
    """Kernels per frame of the serving path (bf16, the GPU code path) at each batch size, as a report: the
    code as written (its split by region) and, with `compile`, compiled as the `compile` mode serves it."""
    target = torch.device(device)
    started = time.perf_counter()
    engine = build_engine(shape, target, torch.bfloat16, seed)
    results = [kernel_entry(engine, shape, batch, seed, compile=fused)
               for batch in progress_over(batches, "batch") for fused in ((False, True) if compile else (False,))]
    return {
        "benchmark": "dia2 kernels per frame",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": shape,
        "model": {"parameters": parameter_count(engine.config), "weights": f"random, seed {seed}"},
        "seed": seed,
        "wall_s": time.perf_counter() - started,
        "machine": {**machine(target), "cuda": torch.version.cuda},
        "results": results,
    }


def kernel_table(report: dict[str, Any]) -> str:
    lines = [f"{report['shape']} on {report['results'][0]['device']}, bf16, kernels per frame"]
    for r in report["results"]:
        split = ", ".join(f"{region} {count:.0f}" for region, count in r["kernels_by_region"].items())
        lines.append(f"batch {r['batch']}, {'compiled' if r['compiled'] else 'as written'} ({r['counted']}): "
                     f"{r['kernels_per_frame']:.0f} ({split})")
    return "\n".join(lines)


def check_modes(device: torch.device, modes: list[str], concurrency: bool = False,
                original_src: Path | None = None) -> None:
    if device.type != "cuda" and any(name in MODES and MODES[name].run.graphs for name in modes):
        raise ValueError("graph mode needs a CUDA device")
    if ORIGINAL in modes:
        if concurrency:
            raise ValueError("--concurrency runs our engine's modes, not the original")
        if original_src is None or not original_available(original_src):
            raise ValueError(f"--original-src: no original Dia2 runtime (dia2/__init__.py) in {original_src}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _release(device: torch.device) -> None:
    """Free what the last measurement left (its state, graphs) so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def progress(call: Callable[[], object], total: int, label: str) -> Callable[[], object]:
    """`call`, printing `label: done/total` over one line of a terminal's stderr (silent when not a terminal)."""
    if not sys.stderr.isatty():
        return call
    done = 0

    def counted() -> object:
        nonlocal done
        result = call()
        done += 1
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        return result

    return counted


def progress_over(items: list, label: str) -> Iterator:
    """The items, printing which one is running over one line of a terminal's stderr."""
    for i, item in enumerate(items):
        if sys.stderr.isatty():
            print(f"\r{label} {item} ({i + 1}/{len(items)})", end="", file=sys.stderr, flush=True)
        yield item
    if sys.stderr.isatty() and items:
        print(file=sys.stderr)


def table(report: dict[str, Any]) -> str:
    """A Markdown table of the results (ms unless named), then the original runtime's rows."""
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def check(checks: dict[str, Any] | None) -> str:
        if checks is None:
            return "-"
        if checks["baseline"] is None:
            return "baseline" + ("" if checks["sampling_repeats"] else ", seeded NOT repeating")
        same = checks["greedy_matches_baseline"] and checks["sampled_matches_baseline"] and checks["sampling_repeats"]
        return f"= {checks['baseline']}" if same else f"DIFFERS from {checks['baseline']}: {checks}"

    head = ("mode", "batch", "p50", "p90", "backbone", "depformer", "sampling+", "codec", "RTF", "audio s/s",
            "real time", "TTFA", "peak GB", "tokens")
    lines = [f"{report['shape']} on {report['results'][0]['device']}, {report['frames']} frames",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        if r["mode"] == ORIGINAL:
            continue
        split = r["split_ms"] or {}
        row = (r["mode"], str(r["batch"]), num(r["ms_per_frame_p50"]), num(r["ms_per_frame_p90"]),
               num(split.get("backbone")), num(split.get("depformer")), num(split.get("sampling")),
               num(r["codec_ms_per_frame"]), num(r["rtf"], 3), num(r["audio_s_per_wall_s"], 2),
               "yes" if r["realtime"] else "no", num(r["ttfa_ms"], 0), num(r["peak_mem_gb"], 2), check(r["checks"]))
        lines.append("| " + " | ".join(row) + " |")
    for r in report["results"]:
        if r["mode"] == ORIGINAL:
            ours, same = r["ours"], r["checks"]["greedy_matches_original"]
            options = ", ".join(name for name, on in r["original_options"].items() if on) or "eager"
            lines.append(f"original runtime ({r['dtype']}, {options}): {num(r['ms_per_frame'])} ms/frame, "
                         f"{num(r['kernels_per_frame'], 0)} kernels/frame over {r['frames']} greedy frames; ours "
                         f"({ours['mode']}): {num(ours['ms_per_frame_p50'])} ms/frame, "
                         f"{num(ours['kernels_per_frame'], 0)} kernels/frame; greedy tokens "
                         + ("equal" if same else "DIFFER"))
    if report["streams_realtime"] is not None:
        lines.append(f"largest real-time batch: {report['streams_realtime']}")
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}; known: {', '.join(MODE_NAMES)}")
    return names


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, help="model shape (default: 2b on CUDA, tiny on a CPU)")
    parser.add_argument("--frames", type=_positive, default=200, help="timed frames per mode or batch size")
    parser.add_argument("--modes", type=_names,
                        help=f"comma-separated, of {', '.join(MODE_NAMES)} (default: eager-fp32, eager-bf16 and graph "
                             "on CUDA, eager-fp32 on CPU; with --concurrency: graph on CUDA, eager-fp32 on CPU)")
    parser.add_argument("--concurrency", type=_sizes, help="batch sizes to sweep, e.g. 1,2,4,8")
    parser.add_argument("--kernels", action="store_true",
                        help="count the kernels of a serving frame by region instead (bf16, the GPU code path), "
                             "as written and compiled")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="with --kernels: only the code as written (compiling a 2b frame takes minutes)")
    parser.add_argument("--batch", type=_sizes, default=[1], help="with --kernels: batch sizes, e.g. 1,64")
    parser.add_argument("--original-src", type=Path,
                        default=Path(os.environ.get("DIA2_ORIGINAL_SRC", DEFAULT_ORIGINAL_SRC)),
                        help="the original nari-labs/dia2 checkout for the original mode (default: $DIA2_ORIGINAL_SRC, "
                             "else ../shared/reference/nari-dia2)")
    parser.add_argument("--compile-original", action="store_true",
                        help="run the original with its use_torch_compile too (on CUDA; compiling takes minutes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="weights and generation seed")
    parser.add_argument("--threads", type=_positive, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the report here (nothing is written without it)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the table, write the JSON when asked; returns the report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    shape = args.shape or ("2b" if device.type == "cuda" else "tiny")
    if not args.kernels:
        try:
            check_modes(device, args.modes or [], bool(args.concurrency), args.original_src)
        except ValueError as exc:
            parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        report = run_kernels(shape, device, args.batch, args.seed, args.compile)
        print(kernel_table(report))
    else:
        report = run(shape, device, args.modes, args.frames, args.seed, args.concurrency, args.original_src,
                     args.compile_original)
        print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
