"""Dia2's two transformers: the backbone (one step per 80 ms frame) and the depformer (one stage per codebook).

Modules read like the math of the spec; every tensor they hold comes from the checkpoint (built on the
meta device, then the checkpoint's tensors are assigned), or is derived from it once at load (q and k norm
weights stacked per head). Shapes: R rows (two CFG branches per
generation), T frames, E backbone width, d depformer width, D head dim. Caches are static: the
backbone writes each frame's K/V at a per-row slot, the depformer at the stage index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import Dia2Config, StackConfig


ROWS_PER_GENERATION = 2  # the conditional and unconditional CFG branches


class Linear(nn.Module):
    """y = x W^T over x [R, ...]. Parameters are created empty: they always come from a checkpoint, and
    skipping the random init keeps building the model (on the meta device) instant."""

    batch_invariant = False  # see Dia2Model.set_batch_invariant

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T, plus `residual` in the same kernel when given."""
        if not self.batch_invariant or x.shape[0] <= ROWS_PER_GENERATION:
            return self._project(x, residual)
        # A matrix product may round differently with more rows (another code path): one generation's rows at
        # a time, so its tokens are the same alone or in any batch.
        parts = x.split(ROWS_PER_GENERATION)
        residuals = [None] * len(parts) if residual is None else residual.split(ROWS_PER_GENERATION)
        return torch.cat([self._project(part, res) for part, res in zip(parts, residuals)])

    def _project(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is None:
            return F.linear(x, self.weight)
        return torch.addmm(residual.flatten(0, -2), x.flatten(0, -2), self.weight.t()).view(residual.shape)


class Embedding(nn.Module):
    """Rows of a table; created empty, like Linear."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.weight)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("silu", "swish", "swiglu"):
        return F.silu
    if name in ("gelu", "geglu"):
        return F.gelu
    if name == "relu":
        return F.relu
    return lambda x: x  # "linear"


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in the model's dtype: the kernel accumulates in float32 itself."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm of several heads at once, each head by its own row of `weight` (broadcast to x)."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def stacked_norm_weights(norms: list[tuple[RMSNorm, int]]) -> torch.Tensor:
    """One weight row per head, for `norm_heads` over heads whose norms are given as (norm, head count)."""
    return torch.cat([norm.weight.expand(count, -1) for norm, count in norms])


def attention_kernels(batch_invariant: bool) -> ContextManager:
    """Batch-invariant attention uses the math kernel: unlike the fused CPU one, what it computes for a row
    does not depend on the other rows or on how many masked cache slots it reads, so a generation's tokens
    are the same alone or in any batch. Otherwise, the fused kernels."""
    return sdpa_kernel([SDPBackend.MATH]) if batch_invariant else contextlib.nullcontext()


def rope_tables(head_dim: int, min_ts: float, max_ts: float, length: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[2, length, D] tables for `apply_rope`: cos(a) and sin(a) with the first half negated, over
    a = cat(angle, angle), angle = pos * (1 / timescale); computed in float32 as the original's, then cast."""
    fraction = (2.0 * torch.arange(0, head_dim // 2, device=device)) / head_dim
    inv_timescale = 1.0 / (min_ts * (max_ts / min_ts) ** fraction)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_timescale)
    sin = angles.sin()
    return torch.stack([torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)]).to(dtype)


def rope_matrices(rope: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RoPE at one position (rope: [2, D] of `rope_tables`) after each of N per-head norm weights [N, D], as
    matrices [N, D, D]: x @ M[n] = apply_rope(x * weights[n], rope). One matrix product instead of five
    elementwise kernels."""
    D = rope.shape[-1]
    cos, signed_sin = rope.reshape(2, D)
    index = torch.arange(D, device=rope.device)
    swapped = index.view(2, -1).flip(0).flatten()  # the other half's index
    matrices = torch.zeros(weights.shape[0], D, D, dtype=weights.dtype, device=weights.device)
    matrices[:, index, index] = weights * cos
    matrices[:, swapped, index] = weights[:, swapped] * signed_sin
    return matrices


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x * cos + cat(-x2, x1) * sin, as x * cos + cat(x2, x1) * signed sin (the same bits).
    x: [..., D]; rope: [2, ..., D] broadcast to x (gathered at each row's positions)."""
    halves_swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * rope[0] + halves_swapped * rope[1]


class MLP(nn.Module):
    """wo(act0(gate) * act1(up)) with gate and up stacked in one wi projection."""

    def __init__(self, dim: int, hidden: int, activations: tuple[str, str]) -> None:
        super().__init__()
        self.wi = Linear(dim, 2 * hidden)
        self.wo = Linear(hidden, dim)
        self.act_gate, self.act_up = activation(activations[0]), activation(activations[1])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.wi(x).chunk(2, dim=-1)
        return self.wo(self.act_gate(gate) * self.act_up(up), residual)


class TextEmbedding(nn.Module):
    """main_proj(emb[main]) + second_proj(emb[second]), the second term dropped where second is pad."""

    def __init__(self, vocab: int, dim: int, rank: int | None, pad_id: int) -> None:
        super().__init__()
        rank = rank or dim
        self.embedding = Embedding(vocab, rank)
        self.main_proj = Linear(rank, dim)
        self.second_proj = Linear(rank, dim)
        self.pad_id = pad_id

    def forward(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        out_second = self.second_proj(self.embedding(second))
        keep = (second != self.pad_id).unsqueeze(-1)
        return self.main_proj(self.embedding(main)) + torch.where(keep, out_second, torch.zeros_like(out_second))


@dataclass
class KVCache:
    """Static K/V for every layer: [L, R, H_kv, S, D]. A row's frame writes slot `slots[r, t]`."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def allocate(cls, layers: int, rows: int, heads: int, length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> "KVCache":
        shape = (layers, rows, heads, length, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def length(self) -> int:
        return self.keys.shape[3]


class Attention(nn.Module):
    """Backbone grouped-query attention: per-head RMSNorm on q and k, RoPE, softmax(q k^T) with scale 1."""

    def __init__(self, cfg: StackConfig, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.gqa_query_heads, cfg.kv_heads, cfg.gqa_head_dim
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = Linear(cfg.n_embd, width)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.n_embd)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        # q_norm's weight for each query head, then k_norm's for each K/V head: one norm for all (at load).
        self.register_buffer("qk_norm_weight", torch.empty(self.heads + self.kv_heads, self.head_dim),
                             persistent=False)
        self.register_load_state_dict_post_hook(Attention._stack_norm_weights)

    def _stack_norm_weights(self, incompatible_keys) -> None:
        self.qk_norm_weight = stacked_norm_weights([(self.q_norm, self.heads), (self.k_norm, self.kv_heads)])

    def forward(self, x: torch.Tensor, rope: torch.Tensor, layer: int, cache: KVCache, rows: torch.Tensor,
                some_rows: bool, slots: torch.Tensor, mask: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """rows [R]: the cache rows of x's rows (`some_rows`: not all of the cache's, in order); slots [R, T]:
        where each frame's K/V go; mask [R, 1, G * T, kv_len]: the slots each packed query row sees (see
        `Backbone.forward`); residual: added to the output projection."""
        R, T, _ = x.shape
        D, H = self.head_dim, self.heads
        qkv = self.qkv(x).view(R, T, H + 2 * self.kv_heads, D)
        qk = apply_rope(norm_heads(qkv[:, :, : H + self.kv_heads], self.qk_norm_weight, self.q_norm.eps), rope)
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + self.kv_heads:]
        keys, values = cache.keys[layer], cache.values[layer]
        keys[rows.unsqueeze(1), :, slots] = k
        values[rows.unsqueeze(1), :, slots] = v
        if some_rows:
            keys, values = keys[rows], values[rows]
        kv_len, groups = mask.shape[-1], self.heads // self.kv_heads
        # Query heads sharing a K/V head attend as extra query rows of that head ([R, H_kv, G * T, D]): the same
        # math as repeating K/V per query head, without copying the cache, and the masked fused kernels accept
        # it (they reject grouped heads with a mask, falling back to one that materialises everything).
        q = q.reshape(R, T, self.kv_heads, groups, D).permute(0, 2, 3, 1, 4).reshape(R, self.kv_heads, groups * T, D)
        out = F.scaled_dot_product_attention(q, keys[:, :, :kv_len], values[:, :, :kv_len], attn_mask=mask,
                                             scale=1.0)
        out = out.view(R, self.kv_heads, groups, T, D).permute(0, 3, 1, 2, 4)
        return self.o_proj(out.reshape(R, T, self.heads * D), residual)


class BackboneLayer(nn.Module):
    def __init__(self, cfg: StackConfig, eps: float) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.attn = Attention(cfg, eps)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)


class Backbone(nn.Module):
    """The frame-rate transformer: text + audio tokens of a frame -> hidden, action logits, codebook-0 logits."""

    batch_invariant = False  # see Dia2Model.set_batch_invariant

    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        data, cfg = config.data, config.model.decoder
        self.num_codebooks, self.audio_vocab = data.num_codebooks, data.audio_vocab_size
        self.text_embed = TextEmbedding(data.text_vocab_size, cfg.n_embd, cfg.low_rank_dim, data.text_pad_token_id)
        # The C per-codebook tables stacked into one [C * V, E] table: one gather per frame.
        self.audio_embed = Embedding(data.num_codebooks * data.audio_vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(BackboneLayer(cfg, config.model.norm_eps) for _ in range(cfg.n_layer))
        self.query_groups = cfg.gqa_query_heads // cfg.kv_heads
        self.norm = RMSNorm(cfg.n_embd, config.model.norm_eps)
        self.action_head = Linear(cfg.n_embd, data.action_vocab_size)
        self.cb0_head = Linear(cfg.n_embd, data.audio_vocab_size)

    def forward(self, tokens: torch.Tensor, rope: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                kv_len: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens: [R, T, 2 + C] (main text, second text, audio codebooks); slots: [R, T] cache slots;
        rows: the cache rows of the R rows (None: all cache rows, in order); attention reads slots < kv_len.

        Returns the normalised hidden [R, T, E] and float32 action / codebook-0 logits.
        """
        offsets = torch.arange(self.num_codebooks, device=tokens.device) * self.audio_vocab
        audio = self.audio_embed(tokens[..., 2:] + offsets)
        x = self.text_embed(tokens[..., 0], tokens[..., 1])
        for c in range(self.num_codebooks):  # summed in codebook order, as the original does
            x = x + audio[..., c, :]
        # Which slots each query row sees, in attention's packed order (query group g, frame t -> row g * T + t).
        R, T = slots.shape
        visible = torch.arange(kv_len, device=tokens.device) <= slots.unsqueeze(-1)  # [R, T, kv_len]
        cache_rows = torch.arange(R, device=tokens.device) if rows is None else rows
        mask = visible.unsqueeze(1).expand(R, self.query_groups, T, kv_len).reshape(R, 1, self.query_groups * T, kv_len)
        with attention_kernels(self.batch_invariant):
            for i, layer in enumerate(self.layers):
                x = layer.attn(layer.pre_norm(x), rope, i, cache, cache_rows, rows is not None, slots, mask, x)
                x = layer.mlp(layer.post_norm(x), x)
        hidden = self.norm(x)
        return hidden, self.action_head(hidden).float(), self.cb0_head(hidden).float()


class StageAttention(nn.Module):
    """Depformer self-attention over this frame's stages; q, k, v and output weights chosen per stage."""

    def __init__(self, cfg: StackConfig, groups: tuple[int, ...], eps: float, stages: int) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.gqa_query_heads, cfg.gqa_head_dim
        inner = self.heads * self.head_dim
        self.in_proj = nn.ModuleDict({str(g): Linear(cfg.n_embd, 3 * inner) for g in groups})
        self.out_proj = nn.ModuleDict({str(g): Linear(inner, cfg.n_embd) for g in groups})
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        # Derived at load: the norms' weights stacked, and 0, 1, 2, ... to index the cache's layers and stages.
        self.register_buffer("qk_norm_weight", torch.empty(2, 1, self.head_dim), persistent=False)
        self.register_buffer("cache_index", torch.empty(max(cfg.n_layer, stages), dtype=torch.long),
                             persistent=False)
        self.register_load_state_dict_post_hook(StageAttention._derive_buffers)

    def _derive_buffers(self, incompatible_keys) -> None:
        self.qk_norm_weight = stacked_norm_weights([(self.q_norm, 1), (self.k_norm, 1)]).unsqueeze(1)
        self.cache_index = torch.arange(self.cache_index.shape[0], device=self.qk_norm_weight.device)

    def forward(self, x: torch.Tensor, stage: int, group: int, rotation: torch.Tensor | None, layer: int,
                cache: KVCache, residual: torch.Tensor) -> torch.Tensor:
        """rotation: [2, D, D] q and k's norm weights and RoPE at this stage (`Depformer.rotations`), or None
        without RoPE."""
        R, H, D = x.shape[0], self.heads, self.head_dim
        qkv = self.in_proj[str(group)](x).view(R, 1, 3, H, D)
        if rotation is None:
            qk = norm_heads(qkv[:, :, :2], self.qk_norm_weight, self.q_norm.eps)  # q and k: [R, 1, 2, H, D]
        else:  # the norms' weights and RoPE at this stage, as one matrix each for q and k
            qk = F.rms_norm(qkv[:, :, :2], (D,), None, self.q_norm.eps) @ rotation
        q, k, v = qk[:, :, 0], qk[:, 0, 1], qkv[:, 0, 2]
        # Written through index tensors rather than at a slice, so compiled code writes the cache in place (it
        # copies the whole cache around a slice assignment that attention then reads).
        at = self.cache_index
        slot = (at[layer: layer + 1], slice(None), slice(None), at[stage: stage + 1])
        cache.keys[slot] = k.unsqueeze(0)
        cache.values[slot] = v.unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), cache.keys[layer, :, :, : stage + 1], cache.values[layer, :, :, : stage + 1],
            scale=1.0,
        )
        return self.out_proj[str(group)](out.reshape(R, H * D), residual)


class DepformerLayer(nn.Module):
    def __init__(self, cfg: StackConfig, groups: tuple[int, ...], eps: float, stages: int) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.n_embd, eps)
        self.self_attention = StageAttention(cfg, groups, eps, stages)
        self.post_norm = RMSNorm(cfg.n_embd, eps)
        self.mlp = MLP(cfg.n_embd, cfg.n_hidden, cfg.mlp_activations)


class Depformer(nn.Module):
    """Predicts codebooks 1..C-1 of a frame, one stage each, from the backbone hidden and the previous codebook."""

    batch_invariant = False  # see Dia2Model.set_batch_invariant

    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        data, cfg = config.data, config.model.depformer
        stages, groups = config.num_stages, config.weight_groups
        self.schedule = config.runtime.weights_schedule
        self.vocab_limit = config.stage_vocab
        self.audio_embeds = nn.ModuleList(Embedding(data.audio_vocab_size, cfg.n_embd) for _ in range(stages))
        self.text_embed = (
            TextEmbedding(data.text_vocab_size, cfg.n_embd, None, data.text_pad_token_id)
            if cfg.text_embedding else None
        )
        backbone_width = config.model.decoder.n_embd
        self.depformer_in = nn.ModuleDict({str(g): Linear(backbone_width, cfg.n_embd) for g in groups})
        self.layers = nn.ModuleList(DepformerLayer(cfg, groups, config.model.norm_eps, stages)
                                    for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, config.model.norm_eps)
        self.logits = nn.ModuleList(Linear(cfg.n_embd, data.audio_vocab_size) for _ in range(stages))

    def forward(self, stage: int, hidden: torch.Tensor, prev_audio: torch.Tensor, main: torch.Tensor,
                second: torch.Tensor, rotations: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Stage `stage` (predicting codebook stage + 1): hidden [R, E]; prev_audio/main/second [G], one per
        group of R / G rows (G = R / 2: a generation's two CFG rows share its tokens); rotations: this
        stage's `rotations` (None: the config applies no RoPE).

        Returns float32 logits [R, vocab_limit]; pad and BOS entries are cut off.
        """
        group = self.schedule[stage]
        token = self.audio_embeds[stage](prev_audio)
        if stage == 0 and self.text_embed is not None:
            token = token + self.text_embed(main, second)
        x = self.depformer_in[str(group)](hidden)
        x = (x.view(token.shape[0], -1, x.shape[-1]) + token.unsqueeze(1)).view(x.shape)
        with attention_kernels(self.batch_invariant):
            for i, layer in enumerate(self.layers):
                x = layer.self_attention(layer.pre_norm(x), stage, group, None if rotations is None else rotations[i],
                                         i, cache, x)
                x = layer.mlp(layer.post_norm(x), x)
        return self.logits[stage](self.norm(x))[..., : self.vocab_limit].float()

    def rotations(self, rope: torch.Tensor) -> torch.Tensor:
        """[L, 2, D, D]: for each layer, q's and k's norm weight followed by RoPE at one stage (rope: [2, D] of
        `rope_tables`, float32) as matrices, computed in float32 once at load and cast to the model's dtype."""
        return torch.stack([rope_matrices(rope, layer.self_attention.qk_norm_weight.reshape(2, -1).float())
                            for layer in self.layers]).to(self.norm.weight.dtype)


class Dia2Model(nn.Module):
    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Backbone(config)
        self.depformer = Depformer(config)

    batch_invariant = False

    def set_batch_invariant(self, on: bool) -> None:
        """The device-dependent numerics policy, set once at load (the engine turns it on for the CPU). On, a
        generation's rows compute the same bits in any batch and at any cache length: dense layers run one
        generation's rows at a time and attention runs the math kernel. The CPU needs both for batched ==
        solo; on a GPU the batched kernels stay, and a job's tokens do not depend on the other rows at one
        batch size."""
        for module in self.modules():
            if isinstance(module, (Dia2Model, Backbone, Depformer, Linear)):
                module.batch_invariant = on

    def extra_repr(self) -> str:
        return f"batch_invariant={self.batch_invariant}"
