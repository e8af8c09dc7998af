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


def uniform(seed: torch.Tensor, frame: torch.Tensor, draw: int) -> torch.Tensor:
    """Uniform floats in [0, 1) per row, determined by (seed, frame, draw index within the frame)."""
    x = _hash32(seed)
    x = _hash32(x ^ ((seed >> 32) & _MASK32))
    x = _hash32(x ^ frame)
    x = _hash32(x ^ draw)
    return (x >> 8).float() * (1.0 / (1 << 24))


def guide(logits: torch.Tensor, scale: torch.Tensor, filter_k: torch.Tensor) -> torch.Tensor:
    """CFG over [2B, V] logits (each generation's conditional row, then its unconditional one): keep conditional
    logits where the guided ones rank in the top filter_k (ties kept), -inf elsewhere. Rows with scale 1 use
    the conditional logits as they are.
    """
    vocab = logits.shape[1]
    cond, uncond = logits[0::2].float(), logits[1::2].float()
    guided = torch.lerp(uncond, cond, scale.unsqueeze(1))
    k = filter_k.clamp(max=vocab)
    kth = guided.sort(dim=-1, descending=True).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    keep = (guided >= kth) | (k <= 0).unsqueeze(1) | (scale == 1.0).unsqueeze(1)
    return torch.where(keep, cond, torch.full_like(cond, float("-inf")))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of [B, V] float32 logits.

    temperature <= 0: argmax (lowest index on ties). Otherwise softmax(logits / temperature), keep the top_k
    probabilities when 0 < top_k < V, renormalise and draw with `u` by inverse CDF; a distribution with no
    mass (all zero or NaN) gives index 0.
    """
    vocab = logits.shape[1]
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-6).unsqueeze(1), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    ranks = torch.arange(vocab, device=logits.device)
    kept = torch.where(ranks < k.unsqueeze(1), sorted_probs, torch.zeros_like(sorted_probs))
    cdf = kept.cumsum(dim=-1)
    total = cdf[:, -1:]
    rank = (cdf <= u.unsqueeze(1) * total).sum(dim=-1)
    rank = torch.minimum(rank, (kept > 0).sum(dim=-1) - 1).clamp(min=0)
    drawn = torch.where(total[:, 0] > 0, order.gather(1, rank.unsqueeze(1))[:, 0], 0)
    return torch.where(temperature > 0, drawn, greedy)
