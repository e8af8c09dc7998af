"""The batch module's parts on their own: the packed step output's named columns, and frame graphs captured
lazily (batch 1 and the shortest cache up front, every other shape on its first use) giving the tokens of
jobs run alone."""

from __future__ import annotations

import logging

import torch

from dia2_worker import graphs
from dia2_worker.batch import BatchRunner, Emitted, RunMode
from dia2_worker.engine import GenerationParams, GenerationRequest
from dia2_worker.output import NOT_SET, PACKED, RowOutput, StepOutput

from conftest import needs_compiler


def test_a_packed_step_output_unpacks_to_the_same_named_values():
    out = StepOutput(frame=torch.tensor([7, 9]), frame_index=torch.tensor([-1, 3]),
                     frame_tokens=torch.tensor([[10, 11, 12], [20, 21, 22]]), word_entry=torch.tensor([2, -1]),
                     first_word_frame=torch.tensor([NOT_SET, 4]), done=torch.tensor([False, True]))
    packed = out.pack()
    assert packed.shape == (2, 3 + len(PACKED))
    rows = [RowOutput.unpack(row, 3) for row in packed.tolist()]
    assert rows[0] == RowOutput(tokens=[10, 11, 12], frame_index=-1, word_entry=2, first_word_frame=NOT_SET, done=0,
                                frame=7)
    assert rows[1] == RowOutput(tokens=[20, 21, 22], frame_index=3, word_entry=-1, first_word_frame=4, done=1,
                                frame=9)


def state_tensors(value) -> list[torch.Tensor]:
    """Every tensor a generation state holds (its caches, text machine and sampling rows included)."""
    if isinstance(value, torch.Tensor):
        return [value]
    out = []
    for item in vars(value).values() if hasattr(value, "__dict__") else ():
        out += state_tensors(item)
    return out


def test_graphs_are_captured_on_first_use_and_give_the_tokens_of_jobs_run_alone(engine, monkeypatch, caplog):
    """A stand-in for CUDA-graph capture on the CPU that behaves like one: warm-up calls run, recording runs
    nothing (the state is put back), a replay reruns the recorded call into the same output tensor."""
    states, recorded = [], []
    new_state = engine.new_state
    monkeypatch.setattr(engine, "new_state", lambda *args: states.append(new_state(*args)) or states[-1])

    def capture(call, warmup, pool):
        for _ in range(warmup):
            call()
        saved = [(t, t.clone()) for t in state_tensors(states[-1])]
        output = call().clone()
        for tensor, copy in saved:
            tensor.copy_(copy)
        recorded.append((output.shape[0], warmup))
        return (lambda: output.copy_(call())), output

    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    requests = [GenerationRequest("[S1] hello world this is a test", GenerationParams(seed=1)),
                GenerationRequest("[S2] fine thanks", GenerationParams(seed=2, audio_temperature=0)),
                GenerationRequest("[S1] the quick brown fox", GenerationParams(seed=3, cfg_scale=3.0))]
    plans = [engine.prepare(r) for r in requests]
    caplog.set_level(logging.INFO, "dia2_worker.graphs")
    runner = BatchRunner(engine, 4, max(p.buffer_length for p in plans), decode_audio=False, mode=RunMode(graphs=True))
    assert list(runner.executor.graphs) == [(1, runner.executor.kv_sizes[0])] and recorded == [(1, 2)]
    frames: dict = {}
    for plan in plans:  # a job joins every third frame: batch sizes 1, 2 and 4 each run for the first time
        slot, emitted = runner.join(plan)
        frames[slot] = [f.tokens for f in emitted.frames]
        for _ in range(3):
            for slot, emitted in runner.step().items():
                frames[slot] += [f.tokens for f in emitted.frames]
    while runner.active:
        for slot, emitted in runner.step().items():
            frames[slot] += [f.tokens for f in emitted.frames]
    assert [size for size, _ in recorded] == [1, 2, 4] and all(warmup == 0 for _, warmup in recorded[1:])
    assert len([r for r in caplog.records if "captured the frame graph" in r.getMessage()]) == 3
    for plan, tokens in zip(plans, frames.values()):
        assert torch.equal(torch.stack(tokens, dim=1), engine.generate(plan).tokens)


@needs_compiler
def test_compiled_frames_give_the_tokens_and_audio_of_eager_ones(engine):
    """The `compile` mode (the step and the codec's one-frame decode fused by torch.compile) is a switch around
    the same code: a greedy job's tokens are those of the eager runner, its audio the same to float32 rounding."""
    plan = engine.prepare(GenerationRequest("[S1] hello world this is a test",
                                            GenerationParams(seed=5, text_temperature=0.0, audio_temperature=0.0)))

    def run(mode: RunMode) -> tuple[torch.Tensor, torch.Tensor]:
        runner = BatchRunner(engine, 1, plan.buffer_length, decode_audio=True, mode=mode)
        slot, emitted = runner.join(plan)
        frames = list(emitted.frames)
        while not emitted.finished:
            emitted = runner.step().get(slot, Emitted())
            frames += emitted.frames
        assert all(f.pcm is not None for f in frames)
        return torch.stack([f.tokens for f in frames], dim=1), torch.cat([torch.as_tensor(f.pcm) for f in frames])

    eager_tokens, eager_pcm = run(RunMode())
    tokens, pcm = run(RunMode(compile=True))
    assert torch.equal(tokens, eager_tokens) and torch.equal(tokens, engine.generate(plan).tokens)
    assert pcm.shape == eager_pcm.shape and torch.allclose(pcm, eager_pcm, atol=1e-4)
