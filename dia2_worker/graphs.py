"""CUDA-graph capture of whole frames: a switch around `Dia2Engine.step`, not a second implementation.

One replay runs the backbone for both CFG branches, every depformer stage, guidance, sampling (seeded by
integer hashing, so no generator state), the delay bookkeeping and the text state machine, all on the
device. The state's tensors are the graph's inputs and outputs in place, so between replays the host only
writes rows of joining generations (with ordinary kernels on the same stream) and reads outputs back.
"""

from __future__ import annotations

from typing import Callable

import torch

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
    with torch.cuda.graph(graph, pool=pool):
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
    """`frame(b, kv_len)` (a frame for the first b rows, attention reading kv_len cache slots) captured for
    every batch size and cache length, replayed by `run(b, kv_len)`. Capturing runs frames, which advances
    every row: capture before any generation joins (joining resets a row entirely)."""

    def __init__(self, frame: Callable[[int, int], torch.Tensor], batch_sizes: list[int],
                 kv_sizes: list[int]) -> None:
        pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
        self.graphs = {(size, kv_len): capture(lambda size=size, kv_len=kv_len: frame(size, kv_len), pool=pool)
                       for size in batch_sizes for kv_len in kv_sizes}

    def run(self, count: int, kv_len: int) -> torch.Tensor:
        replay, output = self.graphs[count, kv_len]
        replay()
        return output
