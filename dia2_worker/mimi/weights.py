"""Published Mimi tensors (transformers' `model.safetensors` names) <-> the codec's own tensors.

Every codec tensor keeps its published name except the code vectors: the checkpoint stores each
codebook's running statistics (`embed_sum`, `cluster_usage`), and the codec holds one stacked
`codebooks` table per quantizer half, embed_sum / max(cluster_usage, 1e-5), computed once here.
Each codebook's `initialized` flag is allowed but unused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, check_names_and_shapes, read_safetensors

CODEBOOKS = ".codebooks"
CLUSTER_USAGE_EPSILON = 1e-5
"""The floor on a code's usage count, as the published model divides by it."""


class MimiCheckpointError(CheckpointError):
    """Mimi tensors that do not match the config: missing, unexpected or mis-shaped."""


def _codebook_names(codebooks_name: str, index: int) -> tuple[str, str, str]:
    """Published names of one codebook's embed_sum, cluster_usage and initialized."""
    prefix = f"{codebooks_name[: -len(CODEBOOKS)]}.layers.{index}.codebook."
    return prefix + "embed_sum", prefix + "cluster_usage", prefix + "initialized"


def published_shapes(codec: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Name -> shape of every tensor a published checkpoint holds for `codec`, and the unused names it may add."""
    required: dict[str, tuple[int, ...]] = {}
    unused: set[str] = set()
    for name, tensor in codec.state_dict().items():
        if not name.endswith(CODEBOOKS):
            required[name] = tuple(tensor.shape)
            continue
        count, size, dim = tensor.shape
        for index in range(count):
            embed_sum, cluster_usage, initialized = _codebook_names(name, index)
            required[embed_sum], required[cluster_usage] = (size, dim), (size,)
            unused.add(initialized)
    return required, unused


def check_published(found: Mapping[str, tuple[int, ...]], codec: nn.Module, source: str) -> None:
    """Raise one MimiCheckpointError naming every missing, unexpected and mis-shaped tensor."""
    required, unused = published_shapes(codec)
    try:
        check_names_and_shapes({n: s for n, s in found.items() if n not in unused}, required, source)
    except CheckpointError as error:
        raise MimiCheckpointError(str(error)) from None


def read_published(path: str | Path, codec: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors `codec` needs from a checked `model.safetensors`: codebook statistics in float32."""
    required, _ = published_shapes(codec)
    statistics = [n for n in required if n.endswith((".embed_sum", ".cluster_usage"))]
    tensors = read_safetensors(path, [n for n in required if n not in statistics], device, dtype)
    tensors.update(read_safetensors(path, statistics, device, torch.float32))
    return tensors


def codec_tensors(codec: nn.Module, published: Mapping[str, Tensor], device: torch.device,
                  dtype: torch.dtype) -> dict[str, Tensor]:
    """Published tensors -> the codec's state dict on `device` in `dtype` (code vectors derived in float32)."""
    check_published({n: tuple(t.shape) for n, t in published.items()}, codec, "Mimi tensors")
    tensors = {}
    for name, tensor in codec.state_dict().items():
        if name.endswith(CODEBOOKS):
            books = []
            for index in range(tensor.shape[0]):
                embed_sum, cluster_usage, _ = _codebook_names(name, index)
                usage = published[cluster_usage].to(device, torch.float32).clamp(min=CLUSTER_USAGE_EPSILON)
                books.append(published[embed_sum].to(device, torch.float32) / usage[:, None])
            tensors[name] = torch.stack(books).to(dtype)
        else:
            tensors[name] = published[name].to(device=device, dtype=dtype)
    return tensors
