"""GPU proofs (skipped without CUDA): the captured frame gives the eager step's tokens, seeded sampling
repeats exactly, a job's tokens in a batch do not depend on the other rows, and attention runs a fused
kernel. bench/gpu.sh runs them on a lent GPU machine; without CUDA, the script's smoke run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dia2_worker.engine import GenerationParams, GenerationRequest
from dia2_worker.batch import BatchRunner, RunMode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FRAMES = 160
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script is the full 8-minute run")
def test_gpu_script_smoke_run_on_the_cpu(tmp_path):
    """bash bench/gpu.sh without CUDA: every stage runs on the tiny shape and writes its JSON."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # tiny: fastest
    done = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu-summary.json").read_text())
    assert (summary["shape"], summary["device"]) == ("tiny", "cpu")
    assert {s["stage"]: s["rc"] for s in summary["stages"]} == dict.fromkeys(
        ("device", "kernels", "speed", "original", "concurrency", "proofs"), 0), summary
    kernels = json.loads((tmp_path / "kernels-tiny.json").read_text())["results"]
    assert [r["batch"] for r in kernels] == [1, 4] and kernels[0]["kernels_per_frame"] > 0
    assert json.loads((tmp_path / "bench-tiny.json").read_text())["results"][0]["mode"] == "eager-fp32"
    (original,) = json.loads((tmp_path / "original-tiny.json").read_text())["results"]
    assert original["checks"] == {"greedy_matches_original": True}
    assert json.loads((tmp_path / "concurrency-tiny.json").read_text())["streams_realtime"] is not None
    proofs = json.loads((tmp_path / "proofs.json").read_text())
    assert proofs and set(proofs.values()) == {"skipped"}  # the proofs need CUDA


@pytest.fixture(scope="module")
def engine_2b():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dia2_worker.random_model import random_engine
    from dia2_worker.shapes import published_config

    return random_engine(published_config("2b"), {}, "cuda", torch.bfloat16, seed=0)  # {}: kyutai/mimi's shape


def run_tokens(engine, params: GenerationParams, graphs: bool, frames: int = FRAMES) -> torch.Tensor:
    """Step one generation `frames` times (a script long enough never to end) and return its buffer."""
    script = "[S1] " + " ".join(["alpha beta gamma delta"] * 40)
    plan = engine.prepare(GenerationRequest(script, params))
    runner = BatchRunner(engine, 1, plan.buffer_length, decode_audio=False,
                         mode=RunMode(graphs=graphs, lag=2 if graphs else 0))
    slot, _ = runner.join(plan)
    for _ in range(frames):
        runner.step()
    torch.cuda.synchronize()
    return runner.state.audio[0, :, : frames + 1].cpu()


@cuda
def test_graph_greedy_tokens_equal_eager(engine_2b):
    greedy = GenerationParams(text_temperature=0.0, audio_temperature=0.0, max_frames=None)
    assert torch.equal(run_tokens(engine_2b, greedy, graphs=True), run_tokens(engine_2b, greedy, graphs=False))


@cuda
def test_seeded_sampling_repeats_in_graph_mode(engine_2b):
    params = GenerationParams(seed=1234)
    first = run_tokens(engine_2b, params, graphs=True)
    assert torch.equal(first, run_tokens(engine_2b, params, graphs=True))
    assert torch.equal(first, run_tokens(engine_2b, params, graphs=False))


@cuda
def test_graph_rows_do_not_disturb_each_other(engine_2b):
    """At one batch size a job's tokens do not depend on what the other rows hold (batched kernels round
    differently for other batch sizes, so that is the exact claim on a GPU)."""
    script = "[S1] " + " ".join(["alpha beta gamma delta"] * 40)
    params = [GenerationParams(seed=s, audio_temperature=t) for s, t in ((1, 0.8), (2, 0.0), (3, 1.0), (4, 0.9), (5, 0.0))]
    plans = [engine_2b.prepare(GenerationRequest(script, p)) for p in params]

    def first_row(batch: list[int]) -> torch.Tensor:
        runner = BatchRunner(engine_2b, 4, plans[0].buffer_length, decode_audio=False,
                             mode=RunMode(graphs=True, lag=2))
        for i in batch:
            runner.join(plans[i])
        for _ in range(64):
            runner.step()
        torch.cuda.synchronize()
        return runner.state.audio[0, :, :65].cpu()

    assert torch.equal(first_row([0, 1, 2]), first_row([0, 3, 4]))


@cuda
def test_backbone_attention_runs_a_fused_kernel(engine_2b):
    """The masked attention of a frame and of a prefill fits a fused kernel: with the math kernel disabled
    SDPA would raise rather than fall back to it (which copies the cache per query head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    state = engine_2b.new_state(2, 1501)
    C, rope = engine_2b.config.num_codebooks, engine_2b.rope(1501)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for T, kv_len in ((1, 512), (1, 1501), (40, 40)):
        tokens = torch.zeros(4, T, 2 + C, dtype=torch.long, device="cuda")
        positions = torch.arange(T, device="cuda").expand(4, T)
        with torch.inference_mode(), sdpa_kernel(fused):
            engine_2b.model.transformer(tokens, rope[:, positions].unsqueeze(-2), state.cache, positions, kv_len)
