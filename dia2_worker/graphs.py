"""CUDA-graph capture of a whole frame: a switch around `Dia2Engine.step`, not a second implementation.

One replay runs the backbone for both CFG branches, every depformer stage, guidance, sampling (seeded by
integer hashing, so no generator state), the delay bookkeeping and the text state machine, all on the
device. The state's tensors are the graph's inputs and outputs in place, so between replays the host only
writes rows of joining generations (with ordinary kernels on the same stream) and reads outputs back.
"""

from __future__ import annotations

from typing import Callable

import torch

from .engine import Dia2Engine, GenerationState, StepOutput

WARMUP_STEPS = 2


def capture(call: Callable[[], object], warmup: int = WARMUP_STEPS) -> tuple[Callable[[], None], object]:
    """`call` captured as one CUDA graph: run a few times on a side stream first (allocator, cuBLAS
    workspaces, lazily built tables), then recorded. Returns the replay function and what the captured
    call returned (its output tensors, rewritten by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    torch.cuda.synchronize()
    return graph.replay, output


class StepGraph:
    """`engine.step(state, kv_len)` captured once; `replay()` returns the same static StepOutput tensors.

    Capturing runs the step a few times (warm-up, then capture), which advances every row of `state`:
    capture before any generation joins, since joining resets a row entirely.
    """

    def __init__(self, engine: Dia2Engine, state: GenerationState, kv_len: int) -> None:
        if state.frame.device.type != "cuda":
            raise ValueError("CUDA graphs need the state on a CUDA device")
        self._replay, self.output = capture(lambda: engine.step(state, kv_len))

    def replay(self) -> StepOutput:
        self._replay()
        return self.output
