"""CUDA-graph capture of a whole frame: a switch around `Dia2Engine.step`, not a second implementation.

One replay runs the backbone for both CFG branches, every depformer stage, guidance, sampling (seeded by
integer hashing, so no generator state), the delay bookkeeping and the text state machine, all on the
device. The state's tensors are the graph's inputs and outputs in place, so between replays the host only
writes rows of joining generations (with ordinary kernels on the same stream) and reads outputs back.
"""

from __future__ import annotations

import torch

from .engine import Dia2Engine, GenerationState, StepOutput

WARMUP_STEPS = 2


class StepGraph:
    """`engine.step(state, kv_len)` captured once; `replay()` returns the same static StepOutput tensors.

    Capturing runs the step a few times (warm-up, then capture), which advances every row of `state`:
    capture before any generation joins, since joining resets a row entirely.
    """

    def __init__(self, engine: Dia2Engine, state: GenerationState, kv_len: int) -> None:
        if state.frame.device.type != "cuda":
            raise ValueError("CUDA graphs need the state on a CUDA device")
        self.engine, self.state, self.kv_len = engine, state, kv_len
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: allocator, cuBLAS workspaces, lazy tables
            for _ in range(WARMUP_STEPS):
                engine.step(state, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = engine.step(state, kv_len)
        torch.cuda.synchronize()

    def replay(self) -> StepOutput:
        self.graph.replay()
        return self.output
