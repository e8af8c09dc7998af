"""Loading Dia2 weights: the published `model.safetensors` or our serving layout, straight to device and dtype.

The engine's modules hold two fusions of the published tensors (backbone q/k/v stacked into one `qkv`
projection; the C audio embedding tables stacked into one table). Everything else keeps its published
name. Names and shapes are checked before anything is built, so a bad checkpoint fails with a list of
what is wrong rather than a stack trace from deep inside torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from .config import Dia2Config
from .model import Dia2Model

AUDIO_EMBED = "transformer.audio_embed.weight"
QKV_SUFFIX = ".attn.qkv.weight"


class CheckpointError(ValueError):
    """The weights do not match the config: missing, unexpected or mis-shaped tensors."""


def engine_shapes(config: Dia2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the engine's modules hold (the serving layout)."""
    with torch.device("meta"):
        model = Dia2Model(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def published_shapes(config: Dia2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a published `model.safetensors`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in engine_shapes(config).items():
        for part, part_shape in _split_shapes(name, shape, config):
            shapes[part] = part_shape
    return shapes


def _split_shapes(name: str, shape: tuple[int, ...], config: Dia2Config) -> list[tuple[str, tuple[int, ...]]]:
    """The published tensors an engine tensor is made of, in concatenation order."""
    if name == AUDIO_EMBED:
        vocab = config.data.audio_vocab_size
        return [(f"transformer.audio_embeds.{c}.weight", (vocab, shape[1])) for c in range(config.num_codebooks)]
    if name.endswith(QKV_SUFFIX):
        dec = config.model.decoder
        base = name[: -len("qkv.weight")]
        q_rows, kv_rows = dec.gqa_query_heads * dec.gqa_head_dim, dec.kv_heads * dec.gqa_head_dim
        return [(f"{base}{p}_proj.weight", (rows, shape[1])) for p, rows in
                (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]
    return [(name, shape)]


def check_names_and_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                           source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    mismatched = [
        f"{name} has shape {list(found[name])}, expected {list(expected[name])}"
        for name in sorted(set(found) & set(expected)) if tuple(found[name]) != tuple(expected[name])
    ]
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match the config: " + " | ".join(problems))


def read_safetensors(path: str | Path, names: Iterable[str] | None, device: torch.device,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `names`) onto `device` in `dtype`, one at a time so peak memory stays one tensor."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in names if names is not None else f.keys():
            out[name] = f.get_tensor(name).to(dtype)
    return out


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def load_published_weights(path: str | Path, config: Dia2Config, device: torch.device,
                           dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A published `model.safetensors`, checked and fused into the engine's layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    check_names_and_shapes(safetensors_shapes(path), published_shapes(config), str(path))
    published = read_safetensors(path, None, device, dtype)
    return fuse_published(published, config)


def fuse_published(published: Mapping[str, torch.Tensor], config: Dia2Config) -> dict[str, torch.Tensor]:
    """Published tensors -> engine tensors (inverse of `_split_shapes`)."""
    engine = {}
    for name, shape in engine_shapes(config).items():
        parts = [published[part] for part, _ in _split_shapes(name, shape, config)]
        engine[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return engine


def build_model(config: Dia2Config, tensors: Mapping[str, torch.Tensor]) -> Dia2Model:
    """Modules built on the meta device, then given the checkpoint's tensors: no init, no copy."""
    check_names_and_shapes({n: tuple(t.shape) for n, t in tensors.items()}, engine_shapes(config), "weights")
    with torch.device("meta"):
        model = Dia2Model(config)
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    return model.eval().requires_grad_(False)
