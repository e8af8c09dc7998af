"""Decode cost per frame of a Mimi shape (by default the real one) with random weights: nothing is downloaded.

Offline decode is timed over all frames at once; streaming decode one frame per call, for each batch
size, waiting for the device after every call as a streaming server reading back audio does. Batches of
more than one row are timed twice: all rows active, and half of them (the others masked out, as rows
with no frame in a step are).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..timing import cpu_name

from .codec import MimiCodec
from .config import MimiConfig
from .streaming import StreamingDecoder
from .weights import published_shapes


def random_published_tensors(config: MimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the published names, scaled so activations stay O(1) (no inf, NaN or denormals)."""
    generator = torch.Generator().manual_seed(seed)
    required, _ = published_shapes(MimiCodec.skeleton(config))
    tensors = {}
    for name, shape in required.items():
        if name.endswith(("cluster_usage", "layernorm.weight")):
            tensors[name] = torch.ones(shape)
        elif name.endswith("bias"):
            tensors[name] = torch.zeros(shape)
        elif name.endswith("layer_scale.scale"):
            tensors[name] = torch.full(shape, 0.1)
        else:
            fan_in = 1 if name.endswith("embed_sum") else max(1, torch.Size(shape[1:]).numel())
            tensors[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    return tensors


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0],
        **_git(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _git() -> dict[str, Any]:
    """The checkout's commit and whether its code has local changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":!bench/results")  # results being written do not make the code dirty
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _timed(run: Callable[[], Any], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def _stream(decoder: StreamingDecoder, codes: torch.Tensor, active: torch.Tensor | None,
            sync: Callable[[], None]) -> list[float]:
    """Seconds per call, decoding `codes` [B, K, T] one frame per call in the `active` rows (None: all)."""
    return [_timed(partial(decoder.decode, codes[:, :, t: t + 1], active), sync) for t in range(codes.shape[2])]


def bench_decode(codec: MimiCodec, frames: int, batch_sizes: tuple[int, ...] = (1, 8), seed: int = 0) -> dict[str, Any]:
    """ms per frame: offline over `frames` frames, streaming over `frames` calls of one frame per active row."""
    device = codec.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, codec.codebook_size, (max(batch_sizes), codec.num_codebooks, frames), generator=generator)
    warmup = min(frames, 5)

    codec.decode(codes[:1, :, :warmup])
    offline_s = min(_timed(lambda: codec.decode(codes[:1]), sync) for _ in range(2))
    results: dict[str, Any] = {"offline_ms_per_frame": 1000 * offline_s / frames, "streaming": []}

    for batch in batch_sizes:
        decoder = codec.streaming_decoder(batch)
        rows = codes[:batch].to(device)
        for active_rows in (batch, batch // 2) if batch > 1 else (batch,):
            active = None if active_rows == batch else torch.arange(batch, device=device) < active_rows
            _stream(decoder, rows[:, :, :warmup], active, sync)
            decoder.reset()
            per_call = _stream(decoder, rows, active, sync)
            mean_ms = 1000 * sum(per_call) / frames
            results["streaming"].append({
                "batch": batch,
                "active_rows": active_rows,
                "ms_per_call": mean_ms,
                "ms_per_call_median": 1000 * sorted(per_call)[frames // 2],
                "ms_per_row_frame": mean_ms / active_rows,
            })
    return results


def run(device: str, dtype: torch.dtype, frames: int, batch_sizes: tuple[int, ...],
        config: MimiConfig | None = None) -> dict[str, Any]:
    config = config or MimiConfig()
    target = torch.device(device)
    start = time.perf_counter()
    codec = MimiCodec.from_tensors(config, random_published_tensors(config), target, dtype)
    build_s = time.perf_counter() - start
    return {
        "benchmark": "mimi decode",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": "kyutai/mimi (MimiConfig defaults), random weights" if config == MimiConfig() else "custom",
        "config": {"num_quantizers": config.num_quantizers, "codebook_size": config.codebook_size,
                   "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                   "sliding_window": config.sliding_window, "frame_size": codec.frame_size},
        "device": str(target),
        "dtype": str(dtype).removeprefix("torch."),
        "frames": frames,
        "audio_s_per_frame": codec.frame_size / codec.sample_rate,
        "build_s": build_s,
        "machine": machine(target),
        "results": bench_decode(codec, frames, batch_sizes),
    }


def report(result: dict[str, Any]) -> str:
    """Human-readable lines for a `run` result."""
    frame_ms = 1000 * result["audio_s_per_frame"]
    res = result["results"]
    lines = [
        f"Mimi decode, {result['shape']}, {result['device']} {result['dtype']}, {result['frames']} frames "
        f"({frame_ms:.0f} ms of audio each); {result['machine']['cpu']}, {result['machine']['torch_threads']} threads",
        f"  offline:                        {res['offline_ms_per_frame']:8.2f} ms/frame  "
        f"(real-time x{frame_ms / res['offline_ms_per_frame']:.1f})",
    ]
    for s in res["streaming"]:
        lines.append(
            f"  streaming batch {s['batch']:<3} ({s['active_rows']:>2} active) {s['ms_per_call']:8.2f} ms/call "
            f"(median {s['ms_per_call_median']:.2f}), {s['ms_per_row_frame']:.2f} ms per row-frame "
            f"(real-time x{frame_ms / s['ms_per_row_frame']:.1f})"
        )
    return "\n".join(lines)
