"""GPU proofs (skipped without CUDA): the captured frame gives the eager step's tokens, seeded sampling
repeats exactly, and a batch in graph mode matches its jobs run alone. Run on the lent GPU machine with
bench/gpu_session.sh."""

from __future__ import annotations

import pytest
import torch

from dia2_worker.engine import GenerationParams, GenerationRequest
from dia2_worker.scheduler import BatchRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FRAMES = 240


@pytest.fixture(scope="module")
def engine_2b():
    from dia2_worker.random_model import random_engine
    from dia2_worker.shapes import published_config

    return random_engine(published_config("2b"), {}, "cuda", torch.bfloat16, seed=0)  # {}: kyutai/mimi's shape


def run_tokens(engine, params: GenerationParams, graphs: bool, frames: int = FRAMES) -> torch.Tensor:
    """Step one generation `frames` times (a script long enough never to end) and return its buffer."""
    script = "[S1] " + " ".join(["alpha beta gamma delta"] * 40)
    plan = engine.prepare(GenerationRequest(script, params))
    runner = BatchRunner(engine, 1, plan.buffer_length, decode_audio=False, graphs=graphs, lag=2 if graphs else 0)
    slot, _ = runner.join(plan)
    for _ in range(frames):
        runner.step()
    torch.cuda.synchronize()
    return runner.state.audio[0, :, : frames + 1].cpu()


def test_graph_greedy_tokens_equal_eager(engine_2b):
    greedy = GenerationParams(text_temperature=0.0, audio_temperature=0.0, max_frames=None)
    assert torch.equal(run_tokens(engine_2b, greedy, graphs=True), run_tokens(engine_2b, greedy, graphs=False))


def test_seeded_sampling_repeats_in_graph_mode(engine_2b):
    params = GenerationParams(seed=1234)
    first = run_tokens(engine_2b, params, graphs=True)
    assert torch.equal(first, run_tokens(engine_2b, params, graphs=True))
    assert torch.equal(first, run_tokens(engine_2b, params, graphs=False))


def test_graph_batch_matches_alone(engine_2b):
    params = [GenerationParams(seed=s, audio_temperature=t) for s, t in ((1, 0.8), (2, 0.0), (3, 1.0))]
    script = "[S1] " + " ".join(["alpha beta gamma delta"] * 40)
    plans = [engine_2b.prepare(GenerationRequest(script, p)) for p in params]
    alone = [run_tokens(engine_2b, p, graphs=True, frames=64) for p in params]
    runner = BatchRunner(engine_2b, 4, plans[0].buffer_length, decode_audio=False, graphs=True, lag=2)
    slots = [runner.join(plan)[0] for plan in plans]
    for _ in range(64):
        runner.step()
    torch.cuda.synchronize()
    for slot, expected in zip(slots, alone):
        assert torch.equal(runner.state.audio[slot.row, :, :65].cpu(), expected)
