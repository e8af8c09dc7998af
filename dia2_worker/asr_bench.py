"""Do running streams stall while a voice prefix is transcribed? Measures the longest gap between a stream's frames
with and without transcriptions running beside the scheduler.

    python -m dia2_worker.asr_bench [--model-dir DIR] [--asr-model-dir DIR] [--audio WAV] [--streams N]
                                    [--frames N] [--device cpu|cuda] [--json OUT]

Streams run on a `Scheduler` (its own thread, as in the worker). Once they are going, `--frames` frames are
timed without transcription, then the same number with transcriptions running back to back on another
thread, as the worker runs them (`asyncio.to_thread`). Without --asr-model-dir the tiny random-weight
model of the demo bake is used: its transcriptions are short, but they run faster-whisper's whole path
(features, encoder, beam search, alignment), so the contention they cause is real. Results go to
bench/results/asr-frame-gap-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dia2-tiny"
SCRIPT = "[S1] " + " ".join(["one two three four five six seven eight nine ten"] * 30)
CONTEXT = 1500


class FrameClock:
    """Arrival times of each stream's frames (on the scheduler thread), and a way to wait for a frame count."""

    def __init__(self, streams: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(streams)]
        self.error: BaseException | None = None
        self._changed = threading.Condition()

    def receiver(self, stream: int):
        def on_output(out) -> None:
            with self._changed:
                if isinstance(out, BaseException):
                    self.error = out
                elif out.frames:
                    self.times[stream].extend([time.perf_counter()] * len(out.frames))
                self._changed.notify_all()
        return on_output

    def wait_frames(self, count: int) -> None:
        """Until every stream has `count` frames (or one failed)."""
        with self._changed:
            self._changed.wait_for(lambda: self.error is not None or min(map(len, self.times)) >= count)
        if self.error is not None:
            raise RuntimeError("a stream failed") from self.error

    def gaps(self, first: int, end: int, after: float = 0.0) -> list[float]:
        """Seconds between consecutive frames of each stream, among its frames first..end-1 that arrived after
        `after` (on time.perf_counter)."""
        gaps = []
        for times in self.times:
            inside = [t for t in times[first:end] if t >= after]
            gaps += [b - a for a, b in zip(inside, inside[1:])]
        return gaps


def summary(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        raise RuntimeError("no frame gaps measured: raise --frames")
    ordered = sorted(gaps)
    return {"frames": len(ordered), "p50_ms": statistics.median(ordered) * 1000,
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000, "max_ms": ordered[-1] * 1000}


def long_context_model(model_dir: Path, scratch: Path) -> Path:
    """The model with a context long enough that the streams outlast both measurements."""
    copy = scratch / "model"
    copy.mkdir()
    for item in model_dir.iterdir():
        if item.name not in ("config.json", "manifest.json"):
            (copy / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config["runtime"]["max_context_steps"] = max(config["runtime"]["max_context_steps"], CONTEXT)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    import numpy as np
    import torch

    from . import audio
    from .asr import WhisperTranscriber
    from .engine import Dia2Engine, GenerationParams, GenerationRequest
    from .random_asr import write_random_asr
    from .scheduler import Scheduler

    asr_dir = args.asr_model_dir
    if asr_dir is None:
        asr_dir = scratch / "asr"
        write_random_asr(asr_dir)
    if args.audio:
        samples, rate = audio.read_audio(args.audio)
    else:
        rate = 24_000
        t = np.arange(int(rate * args.audio_s)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    transcriber = WhisperTranscriber(asr_dir, args.device)
    loaded = time.perf_counter()
    transcriber.load()
    load_s = time.perf_counter() - loaded

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    engine = Dia2Engine.load(long_context_model(args.model_dir, scratch), device=args.device, dtype=dtype)
    scheduler = Scheduler(engine, args.streams, engine.buffer_length(), decode_audio=True)
    clock = FrameClock(args.streams)
    tickets = [scheduler.submit(engine.prepare(GenerationRequest(SCRIPT, GenerationParams(seed=s))),
                                clock.receiver(s)) for s in range(args.streams)]
    try:
        clock.wait_frames(args.warmup_frames + args.frames)

        durations: list[float] = []
        stop = threading.Event()

        def transcribe_until_stopped() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                words = transcriber.transcribe(samples, rate)
                durations.append(time.perf_counter() - started)
                if not words:
                    raise RuntimeError("the recording gave no words")

        worker = threading.Thread(target=transcribe_until_stopped, name="asr-bench")
        busy_start = time.perf_counter()
        worker.start()
        clock.wait_frames(args.warmup_frames + 2 * args.frames)
        stop.set()
        worker.join()
    finally:
        for ticket in tickets:
            ticket.cancel()
        scheduler.close()
    return {
        "quiet": summary(clock.gaps(args.warmup_frames, args.warmup_frames + args.frames)),
        "transcribing": summary(clock.gaps(args.warmup_frames + args.frames, args.warmup_frames + 2 * args.frames,
                                           after=busy_start)),
        "transcriptions": {"count": len(durations), "audio_s": len(samples) / rate,
                           "mean_ms": statistics.mean(durations) * 1000, "model_load_s": load_s},
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.asr_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--asr-model-dir", type=Path, help="a converted Whisper (default: the tiny demo model)")
    parser.add_argument("--audio", type=Path, help="the recording to transcribe (default: a tone, --audio-s long)")
    parser.add_argument("--audio-s", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--frames", type=int, default=150, help="frames timed per stream and condition")
    parser.add_argument("--warmup-frames", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="output (default: bench/results/asr-frame-gap-<device>-<date>.json)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asr-bench-") as scratch:
        results = measure(args, Path(scratch))
    import torch

    from .mimi.bench import machine

    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": args.device,
        "machine": machine(torch.device(args.device)),
        "model_dir": str(args.model_dir), "asr_model_dir": str(args.asr_model_dir or "tiny random demo model"),
        "streams": args.streams, **results,
    }
    path = args.json or RESULTS_DIR / f"asr-frame-gap-{args.device.split(':')[0]}-{report['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    quiet, busy = results["quiet"], results["transcribing"]
    print(f"frame gaps over {args.streams} streams: without transcription p50 {quiet['p50_ms']:.1f} ms, max "
          f"{quiet['max_ms']:.1f} ms; transcribing p50 {busy['p50_ms']:.1f} ms, max {busy['max_ms']:.1f} ms "
          f"({results['transcriptions']['count']} transcriptions of {results['transcriptions']['audio_s']:.1f} s, "
          f"{results['transcriptions']['mean_ms']:.0f} ms each); wrote {path}")
    return path


if __name__ == "__main__":
    main()
