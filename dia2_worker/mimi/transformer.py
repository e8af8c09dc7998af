"""Mimi's transformer: pre-norm causal self-attention over a sliding window of steps, RoPE, layer scales.

A query at step q sees keys at steps q - window < k <= q. The KV cache is a ring of `window` slots per
row (step p in slot p % window) that also records which step each slot holds; a call attends to the
ring plus its own new keys, so any number of new steps per call sees exactly its window. Rows keep
their own step counters, so they can start (and be reset) independently, and a call with an `active` mask
moves only the active rows on (the others' slots, steps and counters stay as they were).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig
from .rows import copy_rows, scatter_rows

EMPTY = -(2**62)
"""The step recorded for an empty slot: further back than any query's window reaches."""


@dataclass
class KVCache:
    """Rotated keys and values of the last `window` steps of every layer, per row."""

    keys: Tensor      # [layers, B, kv_heads, window, head_dim]
    values: Tensor    # [layers, B, kv_heads, window, head_dim]
    slot_step: Tensor  # [B, window] int64: the step each slot holds, EMPTY if none
    next_step: Tensor  # [B] int64: the step number of each row's next input

    def reset(self, rows: Tensor) -> None:
        """Empty the rows where the bool mask `rows` [B] is set."""
        self.keys.masked_fill_(rows.view(1, -1, 1, 1, 1), 0.0)
        self.values.masked_fill_(rows.view(1, -1, 1, 1, 1), 0.0)
        self.slot_step.masked_fill_(rows[:, None], EMPTY)
        self.next_step.masked_fill_(rows, 0)


class RotaryEmbedding(nn.Module):
    inv_freq: Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # Not in the checkpoint, so built on the CPU even when the codec is built on the meta device.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)

    def forward(self, steps: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, T, head_dim] for step numbers [B, T], computed in float32."""
        angles = steps[..., None].float() * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the half-split layout: pairs are (i, i + head_dim / 2)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_keys: Tensor, cache_values: Tensor,
                slots: Tensor, active: Tensor | None) -> Tensor:
        """x [B, T, hidden]; mask [B, 1, T, window + T] over (ring, new keys); slots: where kept new keys go
        (in the `active` rows only)."""
        B, T, _ = x.shape
        q = rotate(self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        keys, values = torch.cat([cache_keys, k], dim=2), torch.cat([cache_values, v], dim=2)
        kept = slots.shape[2]
        scatter_rows(cache_keys, 2, slots, k[:, :, T - kept:], active)
        scatter_rows(cache_values, 2, slots, v[:, :, T - kept:], active)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class LayerScale(nn.Module):
    """A learnt per-channel scale on a residual branch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class MLP(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.self_attn_layer_scale = LayerScale(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_layer_scale = LayerScale(config.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_keys: Tensor, cache_values: Tensor,
                slots: Tensor, active: Tensor | None) -> Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_keys, cache_values, slots, active)
        x = x + self.self_attn_layer_scale(attended)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_hidden_layers)])
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.window = config.sliding_window
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (len(self.layers), batch, self.num_kv_heads, self.window, self.head_dim)
        return KVCache(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            slot_step=torch.full((batch, self.window), EMPTY, device=device, dtype=torch.long),
            next_step=torch.zeros(batch, device=device, dtype=torch.long),
        )

    def forward(self, x: Tensor, cache: KVCache, active: Tensor | None = None) -> Tensor:
        """x [B, T, hidden]: the next T steps of every row -> [B, T, hidden]; the cache moves on T steps in the
        rows of the bool mask `active` [B] (None: all rows)."""
        B, T, _ = x.shape
        steps = cache.next_step[:, None] + torch.arange(T, device=x.device)
        key_steps = torch.cat([cache.slot_step, steps], dim=1)[:, None, :]
        query_steps = steps[:, :, None]
        mask = ((key_steps <= query_steps) & (key_steps > query_steps - self.window))[:, None]
        # Only the last `window` new steps outlive this call (fewer slots than that would collide).
        kept = min(T, self.window)
        kept_steps = steps[:, T - kept:]
        slots = (kept_steps % self.window)[:, None, :, None].expand(B, self.num_kv_heads, kept, self.head_dim)
        cos, sin = self.rotary(steps, x.dtype)
        for layer, cache_keys, cache_values in zip(self.layers, cache.keys, cache.values, strict=True):
            x = layer(x, cos, sin, mask, cache_keys, cache_values, slots, active)
        scatter_rows(cache.slot_step, 1, kept_steps % self.window, kept_steps, active)
        copy_rows(cache.next_step, cache.next_step + T, active)
        return x
