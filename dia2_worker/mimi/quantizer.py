"""Mimi's split residual vector quantizer: semantic codebook(s) first, then the acoustic ones.

Each half projects the latents into its codebook space, quantizes residually (codebook k encodes what
codebooks < k left over) and projects the sum of its code vectors back. The two halves are independent:
the acoustic half quantizes the latents themselves, not what the semantic half left over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig


class ResidualVectorQuantizer(nn.Module):
    codebooks: Tensor  # [num_quantizers, codebook_size, dim]

    def __init__(self, config: MimiConfig, num_quantizers: int) -> None:
        super().__init__()
        hidden, dim = config.hidden_size, config.vector_quantization_hidden_dimension
        project = dim != hidden
        self.input_proj = nn.Conv1d(hidden, dim, 1, bias=False) if project else None
        self.output_proj = nn.Conv1d(dim, hidden, 1, bias=False) if project else None
        # The code vectors, derived at load time from the checkpoint's running statistics.
        self.register_buffer("codebooks", torch.empty(num_quantizers, config.codebook_size, dim))

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, T] (K <= this half's codebooks) -> latents [B, hidden, T]."""
        K, size = codes.shape[1], self.codebooks.shape[1]
        offsets = torch.arange(K, device=codes.device)[:, None] * size
        vectors = F.embedding(codes + offsets, self.codebooks[:K].flatten(0, 1))  # [B, K, T, dim]
        z = vectors.sum(dim=1).transpose(1, 2)
        return z if self.output_proj is None else self.output_proj(z)

    def encode(self, latents: Tensor, num_quantizers: int) -> Tensor:
        """latents [B, hidden, T] -> codes [B, num_quantizers, T]: nearest code vector, in float32."""
        x = latents if self.input_proj is None else self.input_proj(latents)
        B, dim, T = x.shape
        residual = x.transpose(1, 2).reshape(B * T, dim)
        codes = []
        for codebook in self.codebooks[:num_quantizers]:
            nearest = torch.cdist(residual[None].float(), codebook[None].float())[0].argmin(dim=-1)
            residual = residual - F.embedding(nearest, codebook)
            codes.append(nearest.view(B, T))
        return torch.stack(codes, dim=1)


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.num_semantic = config.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(config, config.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(config, config.num_acoustic_quantizers)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, T] -> latents [B, hidden, T]; the first K codebooks (K >= 1)."""
        z = self.semantic_residual_vector_quantizer.decode(codes[:, : self.num_semantic])
        if codes.shape[1] > self.num_semantic:
            z = z + self.acoustic_residual_vector_quantizer.decode(codes[:, self.num_semantic:])
        return z

    def encode(self, latents: Tensor, num_codebooks: int) -> Tensor:
        """latents [B, hidden, T] -> codes [B, num_codebooks, T] (num_codebooks >= the semantic ones)."""
        codes = self.semantic_residual_vector_quantizer.encode(latents, self.num_semantic)
        if num_codebooks > self.num_semantic:
            acoustic = self.acoustic_residual_vector_quantizer.encode(latents, num_codebooks - self.num_semantic)
            codes = torch.cat([codes, acoustic], dim=1)
        return codes
