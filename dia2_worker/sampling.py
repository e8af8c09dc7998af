"""Classifier-free guidance and token sampling, batched with per-row parameters and graph-safe randomness.

Every row carries its own temperature, top-k, CFG scale and filter, and its own seed. Random numbers are
a pure function of (seed, frame, draw, token) computed with integer tensor ops, so a generation's tokens do
not depend on the other rows of the batch, need no host round trip and replay identically inside a CUDA
graph. A frame's numbers are drawn in one pass (Gumbel noise for every draw), and a draw is a dozen kernels
whatever the batch: guidance, the CFG filter's and top-k's thresholds (a sort each), and one argmax of
logits + temperature * noise (the Gumbel-max trick: a sample of softmax(logits / temperature)).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .params import GenerationParams

_MASK32 = 0xFFFFFFFF


KEEP_ALL = 1 << 30
"""A rank past any vocabulary: its threshold keeps every token."""


@dataclass
class SamplingParams:
    """Per-row sampling parameters as the step uses them, all [B] device tensors: temperatures (0: greedy),
    CFG scale, the 0-based ranks of the top-k and CFG filter thresholds (KEEP_ALL where the scale is 1),
    and a 32-bit key mixed from the 63-bit seed."""

    text_temperature: torch.Tensor
    text_top_rank: torch.Tensor
    audio_temperature: torch.Tensor
    audio_top_rank: torch.Tensor
    cfg_scale: torch.Tensor
    filter_rank: torch.Tensor
    seed_key: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, device: torch.device) -> "SamplingParams":
        def floats() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.float32, device=device)

        def longs() -> torch.Tensor:
            return torch.zeros(batch, dtype=torch.long, device=device)

        return cls(floats(), longs(), floats(), longs(), floats(), longs(), longs())

    def load_row(self, row: int, params: GenerationParams) -> None:
        """A generation's (validated, seeded) parameters into `row`."""
        values = dict(text_temperature=params.text_temperature, text_top_rank=params.text_top_k - 1,
                      audio_temperature=params.audio_temperature, audio_top_rank=params.audio_top_k - 1,
                      cfg_scale=params.cfg_scale,
                      filter_rank=KEEP_ALL if params.cfg_scale == 1.0 else params.cfg_filter_k - 1,
                      seed_key=seed_key(params.seed))
        for name, value in values.items():
            getattr(self, name)[row] = value

    def rows(self, rows: slice) -> "SamplingParams":
        """A view of some rows."""
        return SamplingParams(*(getattr(self, f.name)[rows] for f in fields(self)))


def _hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer mixer (a bijection of [0, 2**32)) on int64 tensors or Python ints; the constants are
    below 2**31, so no product reaches 2**63."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key of a 63-bit seed, computed once when a generation joins."""
    return _hash32(_hash32(seed & _MASK32) ^ (seed >> 32))


def frame_noise(seed_key: torch.Tensor, frame: torch.Tensor, draws: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, draws, vocab] for every draw of a frame in one pass: a pure function of (seed, frame,
    draw, token) per row. The frame's key k mixes a counter c over (draw, token) as hash(hash(k ^ c) ^ k):
    hashes are bijections, so two frames never draw the same numbers for the same position."""
    key = _hash32(seed_key ^ frame).unsqueeze(1)
    counter = torch.arange(draws * vocab, device=seed_key.device)
    bits = _hash32(_hash32(key ^ counter) ^ key)
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1): the noise is finite
    return u.log().neg().log().neg().view(-1, draws, vocab)


@dataclass
class DrawSettings:
    """One kind of draw's per-row settings as [B, 1] columns for a vocabulary size: CFG scale, the CFG filter's
    and the top-k's threshold ranks (clamped to the vocabulary), the temperature."""

    scale: torch.Tensor
    filter_rank: torch.Tensor
    top_rank: torch.Tensor
    temperature: torch.Tensor

    @classmethod
    def of(cls, params: SamplingParams, temperature: torch.Tensor, top_rank: torch.Tensor,
           vocab: int) -> "DrawSettings":
        return cls(scale=params.cfg_scale.unsqueeze(1),
                   filter_rank=params.filter_rank.clamp(max=vocab - 1).unsqueeze(1),
                   top_rank=top_rank.clamp(max=vocab - 1).unsqueeze(1), temperature=temperature.unsqueeze(1))


def draw(logits: torch.Tensor, settings: DrawSettings, noise: torch.Tensor,
         banned: torch.Tensor | None = None) -> torch.Tensor:
    """One token per generation from [2B, V] float32 logits (each generation's conditional row, then its
    unconditional one) and Gumbel `noise` [B, V].

    Classifier-free guidance: the conditional logits where the guided ones (lerp(uncond, cond, scale)) rank
    in the top filter_k, ties kept, -inf elsewhere; `banned` tokens are then set to the lowest float. Then
    the token: argmax of those logits when the temperature is 0 (lowest index on ties); otherwise a draw from
    softmax(logits / temperature) over their top_k (ties kept), as the Gumbel-max argmax of
    logits + temperature * noise, which is that same argmax when the temperature is 0.
    """
    pairs = logits.view(-1, 2, logits.shape[-1])
    cond = pairs[:, 0]
    guided = torch.lerp(pairs[:, 1], cond, settings.scale)
    threshold = guided.sort(dim=-1, descending=True).values.gather(1, settings.filter_rank)
    filtered = torch.where(guided >= threshold, cond, float("-inf"))
    if banned is not None:
        filtered = filtered.index_fill(1, banned, torch.finfo(filtered.dtype).min)
    kth = filtered.sort(dim=-1, descending=True).values.gather(1, settings.top_rank)
    scores = torch.where(filtered >= kth, torch.addcmul(filtered, settings.temperature, noise), float("-inf"))
    return scores.argmax(dim=-1)


class FrameDraws:
    """What all draws of one frame share, computed once: Gumbel noise for each draw (the text token's, then
    one per codebook) and the per-row settings for each vocabulary size."""

    def __init__(self, params: SamplingParams, frame: torch.Tensor, draws: int, vocab: int) -> None:
        self.params = params
        self.noise = frame_noise(params.seed_key, frame, draws, vocab)
        self._settings: dict[tuple[bool, int], DrawSettings] = {}

    def _for(self, text: bool, vocab: int) -> DrawSettings:
        if (text, vocab) not in self._settings:
            p = self.params
            temperature, top_rank = ((p.text_temperature, p.text_top_rank) if text
                                     else (p.audio_temperature, p.audio_top_rank))
            self._settings[text, vocab] = DrawSettings.of(p, temperature, top_rank, vocab)
        return self._settings[text, vocab]

    def text(self, logits: torch.Tensor) -> torch.Tensor:
        """The text (action) token from [2B, V] logits: draw 0."""
        vocab = logits.shape[-1]
        return draw(logits, self._for(True, vocab), self.noise[:, 0, :vocab])

    def audio(self, logits: torch.Tensor, codebook: int, banned: torch.Tensor | None = None) -> torch.Tensor:
        """Codebook `codebook`'s token from [2B, V] logits: draw 1 + codebook."""
        vocab = logits.shape[-1]
        return draw(logits, self._for(False, vocab), self.noise[:, 1 + codebook, :vocab], banned)
