"""Our engine against the original nari-labs runtime itself, run side by side on the tiny checkpoint: random
greedy scripts (random words of the tokenizer's vocabulary, pauses, speaker switches, several CFG scales and
filter sizes) give exactly the original's tokens and timestamps.

The original's source is found through DIA2_ORIGINAL_SRC (default: ../shared/reference/nari-dia2 next to
the repository); without it the test is skipped. It needs transformers and sphn (dev requirements).
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from dia2_worker.engine import GenerationParams, GenerationRequest
from dia2_worker.scheduler import BatchRunner

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_SRC = Path(os.environ.get("DIA2_ORIGINAL_SRC", ROOT.parent / "shared" / "reference" / "nari-dia2"))
SCRIPTS = 50
CFG_SCALES = (1.0, 1.5, 2.0, 3.0)
FILTER_KS = (1, 3, 20, 50)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread (both runtimes): CI has two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def original(tiny_dir):
    """The original runtime on the tiny checkpoint, its final Mimi decode skipped: the comparison is of tokens
    and timestamps, and its decode fails on scripts whose output keeps a BOS token (ids past the codebook)."""
    if not (ORIGINAL_SRC / "dia2" / "__init__.py").is_file():
        pytest.skip(f"the original Dia2 runtime is not at {ORIGINAL_SRC} (set DIA2_ORIGINAL_SRC to its checkout)")
    sys.path.insert(0, str(ORIGINAL_SRC))
    try:
        import dia2.engine
    finally:
        sys.path.remove(str(ORIGINAL_SRC))
    patch = pytest.MonkeyPatch()
    patch.setattr(dia2.engine, "decode_audio", lambda runtime, tokens: torch.zeros(1, 1, 0))
    yield dia2.engine.Dia2.from_local(tiny_dir / "config.json", tiny_dir / "model.safetensors", device="cpu",
                                      dtype="float32", tokenizer_id=str(tiny_dir), mimi_id=str(tiny_dir / "mimi"))
    patch.undo()


def random_cases(tiny_dir: Path, count: int, seed: int = 0) -> list[tuple[str, GenerationParams]]:
    """Scripts of 1-3 speaker turns, each of 1-4 words glued from 1-2 random vocabulary entries, with
    punctuation and pauses here and there; greedy, with a random CFG scale and filter size."""
    import json

    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    pieces = sorted({token.removeprefix("\u0120") for token in vocab if re.fullmatch("\u0120?[a-z]+", token)})
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        turns = []
        for _ in range(rng.randint(1, 3)):
            words = ["".join(rng.choices(pieces, k=rng.randint(1, 2))) + rng.choice(["", "", ",", ".", "!", "?"])
                     for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.25:
                words.insert(rng.randint(0, len(words)), f'<break time="{rng.choice([0.2, 0.5, 1.0])}s"/>')
            turns.append(f"[S{rng.randint(1, 2)}] " + " ".join(words))
        params = GenerationParams(text_temperature=0.0, audio_temperature=0.0, cfg_scale=rng.choice(CFG_SCALES),
                                  cfg_filter_k=rng.choice(FILTER_KS), initial_padding=rng.choice([0, 2, 3]))
        cases.append((" ".join(turns), params))
    return cases


def ours_batched(engine, cases) -> list[torch.Tensor]:
    """Every case in one batch (on the CPU a generation's tokens do not depend on the batch), each slot's
    tokens as its frames arrive."""
    plans = [engine.prepare(GenerationRequest(script, params)) for script, params in cases]
    runner = BatchRunner(engine, len(plans), max(p.buffer_length for p in plans), decode_audio=False)
    frames: dict[int, list[torch.Tensor]] = {}
    index = {}
    for i, plan in enumerate(plans):
        slot, emitted = runner.join(plan)
        index[slot] = i
        frames[i] = [f.tokens for f in emitted.frames]
    finished = 0
    while finished < len(plans):
        for slot, emitted in runner.step().items():
            frames[index[slot]] += [f.tokens for f in emitted.frames]
            finished += emitted.finished
    C = engine.config.num_codebooks
    return [torch.stack(f, dim=1) if f else torch.zeros(C, 0, dtype=torch.long) for f in frames.values()]


def original_result(original, script: str, params: GenerationParams):
    from dia2 import GenerationConfig, SamplingConfig

    config = GenerationConfig(text=SamplingConfig(temperature=0.0, top_k=params.text_top_k),
                              audio=SamplingConfig(temperature=0.0, top_k=params.audio_top_k),
                              cfg_scale=params.cfg_scale, cfg_filter_k=params.cfg_filter_k,
                              initial_padding=params.initial_padding)
    return original.generate(script, config=config)


def test_random_greedy_scripts_give_the_original_tokens(original, engine, tiny_dir):
    cases = random_cases(tiny_dir, SCRIPTS)
    assert len({params.cfg_scale for _, params in cases}) == len(CFG_SCALES)
    assert len({params.cfg_filter_k for _, params in cases}) == len(FILTER_KS)
    assert sum("<break" in script for script, _ in cases) >= 5 and sum("[S2]" in s for s, _ in cases) >= 10
    ours = ours_batched(engine, cases)
    mismatched = []
    for i, ((script, params), tokens) in enumerate(zip(cases, ours)):
        expected = original_result(original, script, params)
        if not torch.equal(tokens, expected.audio_tokens[0].cpu()):
            mismatched.append(f"{i}: {script!r} cfg {params.cfg_scale}/{params.cfg_filter_k}")
    assert not mismatched, "differ from the original:\n" + "\n".join(mismatched)


def test_random_greedy_scripts_give_the_original_timestamps(original, engine, tiny_dir):
    for script, params in random_cases(tiny_dir, 6, seed=1):
        ours = engine.generate(GenerationRequest(script, params))
        expected = original_result(original, script, params)
        assert torch.equal(ours.tokens, expected.audio_tokens[0].cpu()), script
        assert ours.timestamps == [(word, time) for word, time in expected.timestamps], script
