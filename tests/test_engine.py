"""The engine against the original runtime's golden outputs, plus streaming, seeding and parameter checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from dia2_worker.engine import (AudioFrame, GenerationParamError, GenerationParams, GenerationRequest, PrefixSpeech,
                                VoicePrefix, Word)

GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


def golden_request(case: dict, tiny_dir) -> GenerationRequest:
    params = GenerationParams(cfg_scale=case["cfg_scale"], cfg_filter_k=case["cfg_filter_k"],
                              initial_padding=case["initial_padding"], **GREEDY)
    prefix = None
    if "prefix_speaker_1" in case:
        samples, rate = sf.read(tiny_dir / case["prefix_speaker_1"], dtype="float32")
        words = json.loads((tiny_dir / case["prefix_speaker_1_words"]).read_text())["words"]
        prefix = VoicePrefix(PrefixSpeech(samples, rate, tuple(tuple(w) for w in words)),
                             include_audio=case["include_prefix"])
    return GenerationRequest(case["script"], params, prefix)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_golden_generations(engine, golden, golden_cases, tiny_dir):
    assert len(golden_cases) == 8
    for case in golden_cases:
        result = engine.generate(golden_request(case, tiny_dir))
        name = case["name"]
        assert torch.equal(result.tokens, golden[f"{name}.audio_tokens"][0]), name
        assert result.frames == case["frames"] and result.waveform.numel() == case["samples"], name
        assert result.timestamps == [tuple(t) for t in case["timestamps"]], name
        assert (result.waveform - golden[f"{name}.waveform"]).abs().max() < 1e-4, name


def test_teacher_forced_backbone_and_depformer(engine, golden):
    model, steps = engine.model, 6
    state = engine.new_state(1, 16)
    rope = engine.rope(16)
    for t in range(steps):
        tokens = golden[f"tf.step{t}.tokens"][:, :, 0].unsqueeze(1)
        positions = torch.full((2, 1), t)
        with torch.inference_mode():
            hidden, action, cb0 = model.transformer(tokens, rope[:, positions].unsqueeze(-2), state.cache,
                                                    positions, t + 1)
        for name, out in (("hidden", hidden), ("action_logits", action), ("cb0_logits", cb0)):
            assert relative_error(out, golden[f"tf.step{t}.{name}"]) < 1e-4, (t, name)
        for s in range(engine.config.num_stages):
            key = f"tf.step{t}.stage{s}"
            with torch.inference_mode():
                logits = model.depformer(s, hidden[:, 0], golden[f"{key}.prev_audio"],
                                         golden[f"tf.step{t}.main_text"], golden[f"tf.step{t}.second_text"],
                                         engine.stage_ropes[s], state.stage_cache)
            assert relative_error(logits, golden[f"{key}.logits"].view(2, -1)) < 1e-4, (t, s)


def test_cpu_attention_kernel_ignores_other_rows_and_masked_slots():
    """The kernel `attention_kernels` picks on the CPU computes a row the same with any number of other rows
    and any number of masked slots after its own (PyTorch's fused CPU kernel does not, for small heads)."""
    import torch.nn.functional as F

    from dia2_worker.model import attention_kernels

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, 2, 16, generator=generator),
               torch.randn(8, 2, 161, 16, generator=generator), torch.randn(8, 2, 161, 16, generator=generator))

    def attend(rows: int, kv_len: int) -> torch.Tensor:
        mask = (torch.arange(kv_len) <= 20).expand(rows, 1, 2, kv_len)
        with attention_kernels(True):
            return F.scaled_dot_product_attention(q[:rows], k[:rows, :, :kv_len], v[:rows, :, :kv_len],
                                                  attn_mask=mask, scale=1.0)[:2]

    reference = attend(2, 161)
    for rows in (2, 4, 8):
        for kv_len in (32, 64, 161):
            assert torch.equal(attend(rows, kv_len), reference), (rows, kv_len)


def test_the_numerics_policy_is_set_once_at_load_and_shown(engine):
    """On the CPU the engine turns batch invariance on for every module that depends on it, and says so."""
    from dia2_worker.model import Backbone, Depformer, Linear

    assert engine.device.type == "cpu" and engine.batch_invariant is True
    assert repr(engine.model).splitlines()[:2] == ["Dia2Model(", "  batch_invariant=True"]
    policed = [m for m in engine.model.modules() if isinstance(m, (Backbone, Depformer, Linear))]
    assert len(policed) > 10 and all(m.batch_invariant for m in policed)


def test_on_the_cpu_a_generation_computes_the_same_bits_in_any_batch_and_cache_length(engine):
    """Four generations' rows (eight) through the backbone and a depformer stage at once, attention reading
    665 cache slots, give bit for bit what each generation's two rows give alone reading 161 or 512 (runners
    read their whole buffer, at least max_context_steps + 1 slots, or whole 512-slot blocks)."""
    cfg, model = engine.config, engine.model
    rows, length, steps = 8, 665, 5
    generator = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.randint(0, 5, (rows, steps, 2), generator=generator),
                        torch.randint(0, cfg.data.audio_vocab_size - 2, (rows, steps, cfg.num_codebooks),
                                      generator=generator)], dim=-1)
    rope = engine.rope(length)

    def run(row_slice: slice, kv_len: int) -> list[torch.Tensor]:
        count = row_slice.stop - row_slice.start
        state = engine.new_state(count // 2, kv_len)
        outputs = []
        for t in range(steps):
            positions = torch.full((count, 1), t)
            with torch.inference_mode():
                hidden, action, cb0 = model.transformer(tokens[row_slice, t: t + 1], rope[:, positions].unsqueeze(-2),
                                                        state.cache, positions, kv_len)
                logits = model.depformer(1, hidden[:, 0], tokens[row_slice, t, 2], tokens[row_slice, t, 0],
                                         tokens[row_slice, t, 1], engine.stage_ropes[1], state.stage_cache)
            outputs += [hidden, action, cb0, logits]
        return outputs

    together = run(slice(0, rows), length)
    for g in range(rows // 2):
        for kv_len in (engine.buffer_length(), 512):
            alone = run(slice(2 * g, 2 * g + 2), kv_len)
            assert all(torch.equal(a, b[2 * g: 2 * g + 2]) for a, b in zip(alone, together)), (g, kv_len)


@pytest.mark.parametrize("include_prefix", [False, True])
def test_stream_is_the_offline_result(engine, golden_cases, tiny_dir, include_prefix):
    case = next(c for c in golden_cases if c.get("include_prefix") == include_prefix)
    request = golden_request(case, tiny_dir)
    sampled = GenerationRequest(request.script, GenerationParams(seed=7), request.prefix)
    for req in (request, sampled):
        events = list(engine.stream(req))
        frames = [e for e in events if isinstance(e, AudioFrame)]
        assert [f.index for f in frames] == list(range(len(frames)))
        streamed = torch.stack([f.tokens for f in frames], dim=1)
        result = engine.generate(req)
        assert torch.equal(streamed, result.tokens)
        assert [(w.text, w.time_s) for w in events if isinstance(w, Word)] == result.timestamps


def test_seeded_sampling_repeats_and_seeds_differ(engine):
    request = GenerationRequest("[S1] hello world [S2] how are you", GenerationParams(seed=1234))
    first, second = engine.generate(request), engine.generate(request)
    assert torch.equal(first.tokens, second.tokens) and first.seed == second.seed == 1234
    other = engine.generate(GenerationRequest(request.script, GenerationParams(seed=99)))
    assert not (other.tokens.shape == first.tokens.shape and torch.equal(other.tokens, first.tokens))
    unseeded = engine.generate(GenerationRequest(request.script))
    assert 0 <= unseeded.seed < 2**63


def test_max_frames_bounds_the_generation(engine):
    result = engine.generate(GenerationRequest("[S1] hi", GenerationParams(max_frames=30, seed=3)))
    assert result.frames <= 30


@pytest.mark.parametrize("param,value", [
    ("text_temperature", -0.1), ("audio_temperature", -1.0), ("audio_temperature", float("nan")),
    ("text_top_k", 0), ("audio_top_k", -3), ("cfg_scale", 0.0), ("cfg_scale", -2.0), ("cfg_filter_k", 0),
    ("initial_padding", -1), ("seed", -5), ("max_frames", 0),
])
def test_bad_parameters_name_the_parameter(engine, param, value):
    with pytest.raises(GenerationParamError) as info:
        engine.prepare(GenerationRequest("[S1] hello", GenerationParams(**{param: value})))
    assert info.value.param == param and str(info.value).startswith(param)


@pytest.mark.parametrize("script", ["", "   \n\t ", "[S1] [S2]"])
def test_empty_text_is_rejected(engine, script):
    with pytest.raises(GenerationParamError) as info:
        engine.prepare(GenerationRequest(script))
    assert info.value.param == "text"


def test_text_longer_than_the_context_is_rejected(engine):
    words = " ".join(["hello world"] * 40)  # tiny config: max_context_steps = 160
    with pytest.raises(GenerationParamError, match="the limit is 160 frames .12.8 s, the model's context") as info:
        engine.prepare(GenerationRequest(f"[S1] {words}"))
    assert info.value.param == "text"
    with pytest.raises(GenerationParamError, match="the limit is 20 frames") as info:
        engine.prepare(GenerationRequest("[S1] hello world this is a test", GenerationParams(max_frames=20)))
    assert info.value.param == "max_frames"


def test_engine_import_does_not_import_transformers():
    code = ("import sys, dia2_worker.engine, dia2_worker.generate; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'whisper')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
