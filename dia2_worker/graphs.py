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


class FrameGraphs:
    """`frame(b)` (a frame for the first b rows) captured for every bucket size; `run(count)` replays the
    smallest that covers `count` rows. Capturing runs frames, which advances every row: capture before any
    generation joins (joining resets a row entirely)."""

    def __init__(self, frame: Callable[[int], torch.Tensor], slots: int) -> None:
        pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
        self.graphs = {size: capture(lambda size=size: frame(size), pool=pool) for size in bucket_sizes(slots)}

    def run(self, count: int) -> torch.Tensor:
        size = min(size for size in self.graphs if size >= count)
        replay, output = self.graphs[size]
        replay()
        return output
