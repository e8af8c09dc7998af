"""Guidance and sampling against simple oracles: greedy is the argmax of the CFG-filtered conditional logits,
sampled tokens follow softmax(logits / temperature) over the top k, and a row's draw depends only on its own
seed, frame and logits."""

from __future__ import annotations

import torch

from dia2_worker.params import GenerationParams
from dia2_worker.sampling import FrameDraws, SamplingParams, _hash32, frame_noise, seed_key


def params_for(rows: list[GenerationParams]) -> SamplingParams:
    sampling = SamplingParams.allocate(len(rows), torch.device("cpu"))
    for row, params in enumerate(rows):
        sampling.load_row(row, params)
    return sampling


def oracle_greedy(logits: torch.Tensor, scale: float, filter_k: int) -> int:
    """One generation's [2, V] logits: argmax of the conditional logits over the guided top filter_k."""
    cond, uncond = logits[0], logits[1]
    if scale == 1.0:
        return int(cond.argmax())
    guided = uncond + scale * (cond - uncond)
    kth = guided.sort(descending=True).values[min(filter_k, guided.numel()) - 1]
    return int(torch.where(guided >= kth, cond, float("-inf")).argmax())


def test_greedy_is_the_argmax_of_the_filtered_conditional_logits():
    generator = torch.Generator().manual_seed(0)
    cases = [GenerationParams(text_temperature=0.0, cfg_scale=scale, cfg_filter_k=k, seed=i)
             for i, (scale, k) in enumerate([(1.0, 1), (2.0, 1), (2.0, 3), (3.0, 50), (1.5, 1000), (0.5, 2)] * 4)]
    logits = torch.randn(2 * len(cases), 40, generator=generator)
    draws = FrameDraws(params_for(cases), torch.zeros(len(cases), dtype=torch.long), 1, 40)
    tokens = draws.text(logits)
    for row, params in enumerate(cases):
        assert int(tokens[row]) == oracle_greedy(logits[2 * row: 2 * row + 2], params.cfg_scale, params.cfg_filter_k)


def test_sampled_tokens_follow_the_top_k_softmax():
    """Without guidance, 40,000 draws (one per frame) of logits over 6 tokens at temperature 0.7 and top-k 4:
    the frequencies are those of softmax(logits / 0.7) over the 4 largest, and the other two never come."""
    frames, logits = 40_000, torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -3.0])
    params = params_for([GenerationParams(audio_temperature=0.7, audio_top_k=4, cfg_scale=1.0, seed=11)] * frames)
    draws = FrameDraws(params, torch.arange(frames), 2, 6)
    tokens = draws.audio(logits.repeat(2 * frames, 1), 0)
    counts = torch.bincount(tokens, minlength=6).double() / frames
    expected = torch.zeros(6, dtype=torch.double)
    top = torch.tensor([3, 0, 1, 4])
    expected[top] = torch.softmax(logits[top].double() / 0.7, dim=0)
    assert counts[2] == 0 and counts[5] == 0
    assert (counts - expected).abs().max() < 0.01, (counts, expected)


def test_a_rows_draw_depends_on_its_own_seed_frame_and_logits_only():
    generator = torch.Generator().manual_seed(1)
    mine = GenerationParams(audio_temperature=1.0, audio_top_k=20, cfg_scale=2.0, cfg_filter_k=30, seed=5)
    others = [GenerationParams(audio_temperature=t, seed=s) for t, s in ((0.0, 1), (1.3, 9), (0.8, 5))]
    logits = torch.randn(8, 64, generator=generator)
    frame = torch.tensor([7, 3, 9, 7])
    together = FrameDraws(params_for([mine, *others]), frame, 3, 64)
    alone = FrameDraws(params_for([mine]), frame[:1], 3, 64)
    for codebook in range(2):
        assert together.audio(logits, codebook)[0] == alone.audio(logits[:2], codebook)[0]
    # Another frame or another seed draws other numbers.
    assert not torch.equal(frame_noise(torch.tensor([seed_key(5)]), torch.tensor([7]), 3, 64),
                           frame_noise(torch.tensor([seed_key(5)]), torch.tensor([8]), 3, 64))
    assert not torch.equal(frame_noise(torch.tensor([seed_key(5)]), torch.tensor([7]), 3, 64),
                           frame_noise(torch.tensor([seed_key(6)]), torch.tensor([7]), 3, 64))


def test_the_seed_key_is_the_same_mix_on_the_host_and_the_device():
    seeds = [0, 1, 12345, 2**32 + 7, 2**63 - 1]
    host = [seed_key(seed) for seed in seeds]
    device = _hash32(_hash32(torch.tensor(seeds) & 0xFFFFFFFF) ^ (torch.tensor(seeds) >> 32))
    assert device.tolist() == host and len(set(host)) == len(seeds)


def test_noise_is_finite_gumbel():
    noise = frame_noise(torch.tensor([seed_key(3)]), torch.tensor([0]), 4, 50_000)
    assert torch.isfinite(noise).all()
    # Gumbel(0, 1): mean = Euler's constant, variance = pi^2 / 6.
    assert abs(float(noise.mean()) - 0.5772) < 0.01 and abs(float(noise.var()) - 1.6449) < 0.03
