"""CUDA-graph capture of whole frames: an executor of `Dia2Engine.step`, not a second implementation.

One replay runs the backbone for both CFG branches, every depformer stage, guidance, sampling (seeded by
integer hashing, so no generator state), the delay bookkeeping and the text state machine, all on the
device. The state's tensors are the graph's inputs and outputs in place, so between replays the host only
writes rows of joining generations (with ordinary kernels on the same stream) and reads outputs back.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

log = logging.getLogger("dia2_worker.graphs")

WARMUP_STEPS = 2


def capture(call: Callable[[], object], warmup: int = WARMUP_STEPS,
            pool: tuple | None = None) -> tuple[Callable[[], None], object]:
    """`call` captured as one CUDA graph: run a few times on a side stream first (allocator, cuBLAS
    workspaces, lazily built tables), then recorded. Returns the replay function and what the captured
    call returned (its output tensors, rewritten by every replay). Graphs sharing a `pool` must never
    run concurrently."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Thread-local: another thread's device work (a voice prefix's encode while a graph is captured on first
    # use) does not invalidate the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = call()
    torch.cuda.synchronize()
    return graph.replay, output


def bucket_sizes(slots: int) -> list[int]:
    """Batch sizes to capture: powers of two below `slots`, and `slots`."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return sizes + [slots]


KV_BLOCK = 512


def kv_buckets(length: int) -> list[int]:
    """Cache lengths attention reads: whole multiples of KV_BLOCK below `length`, and `length`. Reading the
    whole cache costs a 2B model ~340 MB per generation per frame; blocks of 512 slots (41 s of audio) keep
    the graphs few (three for the 2B's 1,501 slots) and cover most jobs with the first."""
    return list(range(KV_BLOCK, length, KV_BLOCK)) + [length]


def cover(sizes: list[int], needed: int) -> int:
    """The smallest of `sizes` that is at least `needed`."""
    return min(size for size in sizes if size >= needed)


class FrameGraphs:
    """`frame(b, kv_len)` (a frame for the first b rows, attention reading kv_len cache slots) as one CUDA graph
    per batch size and cache length, replayed by `run(b, kv_len)`.

    Only what a first job needs is captured up front, before any generation joins (its warm-up runs frames,
    which advance every row): batch 1 and the shortest cache. Any other shape is captured on its first use:
    that frame runs eagerly (the warm-up, on the rows' real inputs), then it is recorded, which runs nothing,
    so the rows in use advance exactly once and wait about one frame's host time for the capture.
    """

    def __init__(self, frame: Callable[[int, int], torch.Tensor], batch_sizes: list[int],
                 kv_sizes: list[int]) -> None:
        self.frame, self.batch_sizes, self.kv_sizes = frame, batch_sizes, kv_sizes
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.capture_s = 0.0
        self._record(batch_sizes[0], kv_sizes[0], WARMUP_STEPS)

    def run(self, count: int, kv_len: int) -> torch.Tensor:
        if (count, kv_len) not in self.graphs:
            output = self.frame(count, kv_len)
            self._record(count, kv_len, warmup=0)
            return output
        replay, output = self.graphs[count, kv_len]
        replay()
        return output

    def _record(self, count: int, kv_len: int, warmup: int) -> None:
        started = time.perf_counter()
        self.graphs[count, kv_len] = capture(lambda: self.frame(count, kv_len), warmup, self.pool)
        seconds = time.perf_counter() - started
        self.capture_s += seconds
        log.info("captured the frame graph for batch %d, cache %d in %.2f s: %d of %d graphs, %.2f s in all",
                 count, kv_len, seconds, len(self.graphs), len(self.batch_sizes) * len(self.kv_sizes),
                 self.capture_s)
