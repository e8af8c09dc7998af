"""Classifier-free guidance and token sampling, batched with per-row parameters and graph-safe randomness.

Every row carries its own temperature, top-k, CFG scale and filter, and its own seed. Random numbers are
a pure function of (seed, frame, draw) computed with integer tensor ops, so a generation's tokens do not
depend on the other rows of the batch, need no host round trip and replay identically inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """Per-row sampling parameters, all [B] device tensors."""

    text_temperature: torch.Tensor
    text_top_k: torch.Tensor
    audio_temperature: torch.Tensor
    audio_top_k: torch.Tensor
    cfg_scale: torch.Tensor
    cfg_filter_k: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, device: torch.device) -> "SamplingParams":
        def floats() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.float32, device=device)

        def longs() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.long, device=device)

        return cls(floats(), longs(), floats(), longs(), floats(), longs(), longs())

    def load_row(self, row: int, **values: float) -> None:
        for name, value in values.items():
            getattr(self, name)[row] = value

    def rows(self, rows: slice) -> "SamplingParams":
        """A view of some rows."""
        return SamplingParams(*(getattr(self, f.name)[rows] for f in fields(self)))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors; constants < 2**31 keep every product below 2**63."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def frame_noise(seed: torch.Tensor, frame: torch.Tensor, draws: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, draws, vocab] for every draw of a frame, in one pass: a pure function of (seed, frame,
    draw, token) per row. Two keys per (row, frame) mix a counter over (draw, token), so two frames of a row
    never repeat each other's numbers."""
    key = _hash32(_hash32(seed) ^ ((seed >> 32) & _MASK32))
    key = _hash32(key ^ frame).unsqueeze(1)
    second = _hash32(key ^ 0x2545F491)
    counter = torch.arange(draws * vocab, device=seed.device)
    bits = _hash32(_hash32(key ^ counter) ^ second)
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1): the noise is finite
    return u.log().neg().log().neg().view(-1, draws, vocab)


@dataclass
class DrawSettings:
    """Per-row settings of one kind of draw over a vocabulary of `vocab` tokens, as [B, 1] columns computed once
    a frame: CFG scale, the rank of the CFG filter's threshold and the rows it keeps whole, the rank of the
    top-k threshold, the temperature."""

    scale: torch.Tensor
    filter_rank: torch.Tensor
    keep_all: torch.Tensor
    top_rank: torch.Tensor
    temperature: torch.Tensor

    @classmethod
    def of(cls, params: SamplingParams, temperature: torch.Tensor, top_k: torch.Tensor,
           vocab: int) -> "DrawSettings":
        filter_k = params.cfg_filter_k.unsqueeze(1)
        return cls(scale=params.cfg_scale.unsqueeze(1), filter_rank=(filter_k.clamp(1, vocab) - 1),
                   keep_all=(filter_k <= 0) | (params.cfg_scale == 1.0).unsqueeze(1),
                   top_rank=top_k.unsqueeze(1).clamp(1, vocab) - 1, temperature=temperature.unsqueeze(1))


def draw(logits: torch.Tensor, settings: DrawSettings, noise: torch.Tensor,
         banned: torch.Tensor | None = None) -> torch.Tensor:
    """One token per generation from [2B, V] float32 logits (each generation's conditional row, then its
    unconditional one) and Gumbel `noise` [B, V].

    Classifier-free guidance: the conditional logits where the guided ones (lerp(uncond, cond, scale)) rank
    in the top filter_k, ties kept, -inf elsewhere (all of them where the scale is 1); `banned` tokens are
    then set to the lowest float. Then the token: argmax of those logits when the temperature is 0 (lowest
    index on ties); otherwise a draw from softmax(logits / temperature) over the top_k of them (ties kept),
    as the Gumbel-max argmax of logits + temperature * noise, which is the same argmax when the temperature
    is 0.
    """
    pairs = logits.view(-1, 2, logits.shape[-1])
    cond = pairs[:, 0]
    guided = torch.lerp(pairs[:, 1], cond, settings.scale)
    kept = (guided >= guided.sort(dim=-1, descending=True).values.gather(1, settings.filter_rank)) | settings.keep_all
    filtered = torch.where(kept, cond, float("-inf"))
    if banned is not None:
        filtered = filtered.index_fill(1, banned, torch.finfo(filtered.dtype).min)
    kth = filtered.sort(dim=-1, descending=True).values.gather(1, settings.top_rank)
    scores = torch.where(filtered >= kth, torch.addcmul(filtered, settings.temperature, noise), float("-inf"))
    return scores.argmax(dim=-1)
