"""Loading Dia2 weights: the published `model.safetensors` or our serving layout, straight to device and dtype.

The engine's modules hold two fusions of the published tensors (backbone q/k/v stacked into one `qkv`
projection; the C audio embedding tables stacked into one table). Everything else keeps its published
name. Names and shapes are checked before anything is built, so a bad checkpoint fails with a list of
what is wrong rather than a stack trace from deep inside torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .config import Dia2Config
from .model import Dia2Model

AUDIO_EMBED = "transformer.audio_embed.weight"
QKV_SUFFIX = ".attn.qkv.weight"
MANIFEST = "manifest.json"
LAYOUT_VERSION = 1
"""Serving layout written by bake_weights.py: engine tensor names (fusions applied), one dtype, a manifest."""


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


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
STAGING_BYTES = 64 * 1024 * 1024


def read_to_device(path: str | Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of one device buffer filled by sequential reads.

    The file is read in large chunks into two pinned host buffers in turn; each chunk's copy to the GPU
    runs while the next chunk is read, so the load goes at disk (or page cache) speed with no per-tensor
    overhead. safetensors lays tensors out largest element size first from an 8-byte aligned start, so
    every view is aligned.
    """
    import struct

    with open(path, "rb", buffering=0) as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        size = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        data = torch.empty(size, dtype=torch.uint8, device=device)
        pinned = device.type == "cuda"
        staging = [torch.empty(min(STAGING_BYTES, max(size, 1)), dtype=torch.uint8, pin_memory=pinned)
                   for _ in range(2)]
        in_flight: list = [None, None]
        offset = 0
        while offset < size:
            turn = (offset // STAGING_BYTES) % 2
            if in_flight[turn] is not None:
                in_flight[turn].synchronize()  # the copy out of this buffer has finished
            count = f.readinto(memoryview(staging[turn].numpy())[: min(STAGING_BYTES, size - offset)])
            if not count:
                raise CheckpointError(f"{path}: file ends at byte {8 + header_size + offset}, "
                                      f"its header says {8 + header_size + size}")
            data[offset: offset + count].copy_(staging[turn][:count], non_blocking=pinned)
            if pinned:
                in_flight[turn] = torch.cuda.Event()
                in_flight[turn].record()
            offset += count
    if pinned:
        torch.cuda.current_stream(device).synchronize()
    return {name: data[entry["data_offsets"][0]: entry["data_offsets"][1]].view(_DTYPES[entry["dtype"]])
            .view(entry["shape"]) for name, entry in header.items()}


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


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    """The baked directory's manifest, after the checks cheap enough for every start: layout version,
    and every listed file present with its recorded size. None for a directory in the published layout."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-run bake_weights.py") from None
    version = manifest.get("layout_version")
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"{path}: serving layout version {version!r}, this worker reads version "
                              f"{LAYOUT_VERSION}; re-run bake_weights.py")
    for name, entry in manifest.get("files", {}).items():
        file = model_dir / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file}: {size} bytes, {MANIFEST} says {entry['size']} "
                                  f"({'truncated' if size < entry['size'] else 'changed'}); re-run bake_weights.py")
    return manifest


def load_weights(model_dir: str | Path, config: Dia2Config, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Engine tensors from a baked directory (read as they are) or a published one (checked and fused).

    A baked file goes to a GPU in one sequential pass (`read_to_device`).
    """
    from .timing import PHASES

    model_dir = Path(model_dir)
    path = model_dir / "model.safetensors"
    if read_manifest(model_dir) is None:
        with PHASES.phase("weights (published layout)"):
            return load_published_weights(path, config, device, dtype)
    check_names_and_shapes(safetensors_shapes(path), engine_shapes(config), str(path))
    with PHASES.phase("weights read + to device"):
        if device.type == "cuda":
            return {name: t.to(dtype) for name, t in read_to_device(path, device).items()}
        return read_safetensors(path, None, device, dtype)


def fuse_published(published: Mapping[str, torch.Tensor], config: Dia2Config) -> dict[str, torch.Tensor]:
    """Published tensors -> engine tensors (inverse of `_split_shapes`)."""
    engine = {}
    for name, shape in engine_shapes(config).items():
        parts = [published[part] for part, _ in _split_shapes(name, shape, config)]
        engine[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return engine


def build_model(config: Dia2Config, tensors: Mapping[str, torch.Tensor]) -> Dia2Model:
    """Modules built on the meta device, then given the (already checked) tensors: no init, no copy."""
    with torch.device("meta"):
        model = Dia2Model(config)
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    return model.eval().requires_grad_(False)
